"""Version constants, in a leaf module so that any module can import them without importing the package's API."""

__version__ = "0.1.0"
#: Version of the plugin API (hooks, Batch, ModelOutputs, TrainState): a plugin made for
#: MAJOR.MINOR runs on any MAJOR.N with N >= MINOR. 1.1: ``TrainState.forward_student``. 1.2: ``Trainable``
#: (a plugin module's own learning rate and clipping), ``ModelOutputs.layer_mask`` and ``.sample_mask``,
#: ``load_data`` (a plugin's own data file, read as the run's); tasks as modules (``Task``, ``get_task``,
#: ``TrainState.task_def``); ``TrainState.run_teacher`` and ``.fuse_teacher_outputs`` (the teacher runner, cache
#: included); typed loss hints (``LossHints``, ``Batch.with_hints``, ``Batch.loss_hints``) for what 1.1 passed in
#: ``batch.meta["temperature"]``/``["sample_weights"]`` (still read). 1.3: ``TrainState.normalized_embeddings``,
#: ``Task.save_files`` (a saved student's files besides weights and tokenizer). 1.4: multi-task runs
#: (``MultiTaskConfig``; each task's hooks get that task's ``TrainState``, whose ``step`` is the run's).
API_VERSION = "1.4"
