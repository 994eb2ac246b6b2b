"""Every first-party plugin enabled at once, by entry-point name, in one run."""

from __future__ import annotations

import polydistill

from conftest import parallel_config


def test_all_plugins_together(models, data, tmp_path):
    syn = tmp_path / "synonyms.tsv"
    syn.write_text("suppe\teintopf\nbrot\tlaib\nspiel\tpartie\n", encoding="utf-8")
    dic = tmp_path / "en-de.txt"
    dic.write_text("soup suppe\nbread brot\nmatch spiel\nwind wind\nsnow schnee\n", encoding="utf-8")
    teachers = [{"model": str(models["teacher"]), "name": "t1"}, {"model": str(models["teacher2"]), "name": "t2"}]
    plugins = {
        "kd": {"kl": 1.0},
        "synonym": {"dictionary": str(syn), "probability": 1.0, "word_probability": 1.0},
        "code_switch": {"dictionaries": {"de": str(dic)}, "probability": 1.0, "side": "teacher"},
        "adaptive_temperature": {"schedule": "cosine", "start": 4.0, "end": 1.0},
        "dropout": {"hidden": 0.2, "attention": 0.0},
        "l2": {"sp_alpha": 0.01},
        "multi_teacher": {"fusion": "confidence"},
        "gan_data": {"ratio": 0.5, "length": 6},
    }
    cfg = parallel_config(models, data, tmp_path, teachers=teachers, plugins=plugins, training__epochs=2)
    cfg["student"] = {"from_teacher": {"teacher": "t1", "layers": [0, 2]}}
    result = polydistill.train(cfg)
    steps = [r for r in result.history if "loss" in r]
    assert len(steps) == 6
    logged = set().union(*steps)
    for key in ("loss/kl", "loss/gan_data", "reg/l2_sp", "synonym/augmented", "code_switch/augmented",
                "adaptive_temperature/temperature", "kd/temperature"):
        assert key in logged, key
    assert any(k.startswith("multi_teacher/") for k in logged)
    # the scheduled temperature is the one kd used, from 4 down to 1
    temps = [r["kd/temperature"] for r in steps]
    assert temps[0] == 4.0 and temps[-1] == 1.0
    assert result.plugins.keys() == {"kd", *plugins}
