"""mdt-study end to end on the bundled digits: 2 variants, a few steps each on 2 real ranks, judged
post hoc; study.md, study.png, study.json and every run's metrics.jsonl agree; a rerun trains and
judges nothing again."""

from __future__ import annotations

import json
import struct

import pytest
import yaml

from trainer.evaluation.history import read_metrics
from trainer.study.runner import run_study

from launcher import ROOT, env, tiny_config

pytestmark = pytest.mark.timeout(900)


def test_a_two_variant_study_runs_and_reports_consistently(digits8, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(digits8, str(tmp_path / "unused"), run={"total_steps": 10},
                      eval={"every": 5, "metrics": ["digits"], "guidance_scales": [1.0], "num_images": 10,
                            "batch_size": 10, "steps": 3},
                      monitor={"log_every": 5, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 2})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(cfg))
    study = {"name": "e2e", "base": "base.yaml", "output_dir": str(tmp_path / "out"), "ranks": 2,
             "budget": {"images": 160}, "quality": "digits_fd", "baseline": "masked", "seeds": [0],
             "guidance": [1, 2], "skip_cache": 2, "posthoc_images": 10,
             "variants": [{"name": "masked"}, {"name": "unmasked", "set": ["phases.mask_ratio=0.0"]}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    for key, value in env().items():  # the ranks find the project and single-threaded torch
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    summary = run_study(str(path))
    out = tmp_path / "out"
    assert (out / "study.md").exists() and (out / "study.json").exists()
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 300
    saved = json.loads((out / "study.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["masked", "unmasked"]
    md = (out / "study.md").read_text()
    for variant in saved["variants"]:
        records = read_metrics(str(out / f"{variant['name']}-s0"))
        assert [r["step"] for r in records] == [5, 10] and records[-1]["final"]
        final = records[-1]["metrics"]["digits_fd"]
        # the report's number is the run's own final evaluation, and study.md prints it
        assert variant["final"]["values"] == [final] and variant["at_budget"]["images_seen"] == 160
        assert f"| {final:.4g} |" in md
        assert set(variant["guided"]["scales"]) == {"1", "2"}  # the post-hoc guidance sweep
        posthoc = json.loads((out / f"{variant['name']}-s0" / "posthoc.json").read_text())
        assert set(posthoc["guidance"]) == {"1", "2"} and posthoc["settings"]["images"] == 10
        # the tiny config's models have skip branches: Skip-Cache judged at every scale, its speed-up reported
        assert set(posthoc["skip_cache"]["guidance"]) == {"1", "2"} and posthoc["skip_cache"]["interval"] == 2
        assert variant["skip_cache"]["interval"] == 2 and variant["skip_cache"]["speedup"] > 0
    assert saved["target"] == saved["variants"][0]["final"]["mean"]  # the baseline's final quality
    assert summary["target"] == saved["target"]
    # rerunning resumes nothing: every run is finished and judged
    capsys.readouterr()
    again = run_study(str(path))
    printed = capsys.readouterr().out
    assert "2 already finished" in printed and "starts" not in printed and "post-hoc" not in printed
    assert json.dumps(again, sort_keys=True) == json.dumps(summary, sort_keys=True)
