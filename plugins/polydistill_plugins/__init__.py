"""First-party polydistill plugins. Each module is one plugin, registered only through
the ``polydistill.plugins`` entry-point group, and imports only the public ``polydistill`` API."""
