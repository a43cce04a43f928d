"""The pipeline's config: closed sets refused on a typo, the demo's environment knobs mapped onto config keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config
from pipelines import full_run
from pipelines.config import PipelineConfig
from pipelines.stages import demo_stages, real_stages


def test_a_mode_typo_is_refused_naming_the_key_and_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "pipe.yaml"
    path.write_text("mode: dmeo\n")
    with pytest.raises(ConfigError, match=r"mode.*'demo', 'real'.*dmeo"):
        load_config(PipelineConfig, path, [])
    with pytest.raises(ConfigError, match=r"task.*'vqa', 'gqa', 'nlvr2'"):
        load_config(PipelineConfig, None, ["real.finetune=[{task: vqq}]"])


def test_a_typo_in_the_config_stops_the_driver_with_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "pipe.yaml"
    path.write_text("mode: dmeo\n")
    assert full_run.main(["--config", str(path), "--dry-run"]) == 1
    assert "mode" in capsys.readouterr().err


def test_environment_knobs_are_config_keys(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WEIGHTS", "/w/faster_rcnn_from_caffe_attr.pkl")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.delenv("CONFIG", raising=False)
    assert full_run.main(["--dry-run", "--run-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "--weights /w/faster_rcnn_from_caffe_attr.pkl" in out and "--random-weights" not in out
    assert "--config vg_r101_c4" in out  # real weights: the full detector unless CONFIG says otherwise
    assert "--device cpu" in out and "train.device=cpu" in out
    # the same through the config keys, and an explicit key beats the default detector
    monkeypatch.delenv("WEIGHTS")
    monkeypatch.delenv("DEVICE")
    cfg = load_config(PipelineConfig, None, ["demo.detector_config=vg_tiny", "demo.weights=w.pkl"])
    extract = next(s for s in demo_stages(cfg, tmp_path) if s.name == "extract").command()
    assert extract[extract.index("--config") + 1] == "vg_tiny" and "w.pkl" in extract


def test_real_recipe_converts_vqa_with_lxmerts_minival_list(tmp_path: Path) -> None:
    """The real config passes LXMERT's minival list to lxmert-data; without one the pipeline refuses to start."""
    config = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "lxmert.yaml"
    cfg = load_config(PipelineConfig, config, [])
    stages = {s.name: s for s in real_stages(cfg, tmp_path)}
    for subset in ("minival", "nominival"):
        cmd = stages[f"data_vqa_{subset}"].command()
        assert cmd[cmd.index("--subset") + 1] == subset
        assert cmd[cmd.index("--minival-images") + 1] == "data/lxmert/mscoco_minival.json"
        assert cmd[cmd.index("--out") + 1] == f"data/vqa/{subset}.json"
    assert "--minival-images" not in stages["data_vqa_train"].command()
    assert list(stages)[:4] == ["data_vqa_train", "data_vqa_minival", "data_vqa_nominival", "data_vqa_test"]
    with pytest.raises(ConfigError, match=r"real\.vqa_data\.minival_images is empty.*mscoco_minival\.json"):
        real_stages(load_config(PipelineConfig, config, ["real.vqa_data.minival_images="]), tmp_path)
    # converted JSON at hand: no conversion stage, no list needed
    ready = load_config(
        PipelineConfig, config, ["real.vqa_data.minival_images=", "real.vqa_data.val_questions="]
    )
    assert not any(name.startswith("data_vqa_m") for name in (s.name for s in real_stages(ready, tmp_path)))
