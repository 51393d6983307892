"""torch.compile of the training module: one graph per kept-token count (not per mask-ratio float),
the same numbers as eager, and a 2-rank compiled run that says when it compiles. The backends used
here trace exactly as inductor does (dynamo, and AOTAutograd for aot_eager) without generating
kernels, which takes a minute per graph on these CPUs; benchmarks/gpu_check.sh times inductor."""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo

from model_zoo.layers import canonical_mask_ratio, kept_token_count
from model_zoo.registry import build_model
from trainer.config import config_from_dict
from trainer.training.engine import compiled_graphs
from trainer.training.task import TrainingModule

from launcher import free_port, losses, run, runs_in, tiny_config, train_each_command, write_config

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "decoder_depth": 1, "decoder_hidden_size": 16,
        "decoder_num_heads": 2}
RATIOS = [0.5, 0.49, 0.45, 0.0, 0.3, 0.31, 0.5]  # 16 tokens: 8, 8, 8, 16, 11, 11, 8 kept


@pytest.mark.parametrize("tokens", [16, 64, 256, 576, 1024])
def test_canonical_ratio_keeps_the_same_tokens_and_is_one_float_per_count(tokens):
    grid = [i / 1000 for i in range(0, 1000)]
    by_count = {}
    for r in grid:
        c = canonical_mask_ratio(tokens, r)
        assert kept_token_count(tokens, c) == kept_token_count(tokens, r)
        by_count.setdefault(kept_token_count(tokens, r), set()).add(c)
    assert all(len(floats) == 1 for floats in by_count.values())
    assert canonical_mask_ratio(tokens, 0.0) == 0.0


def _module() -> TrainingModule:
    cfg = config_from_dict({"model": {"name": "MaskDiT-S/2", "options": TINY}})
    torch.manual_seed(0)
    return TrainingModule(build_model("MaskDiT-S/2", **cfg.model_kwargs((3, 8, 8), 10)), cfg)


def _graphs_for(ratios, canonical: bool) -> int:
    torch._dynamo.reset()
    compiled = torch.compile(_module(), backend="eager")
    before = compiled_graphs()
    z, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for r in ratios:
        compiled(z, y, canonical_mask_ratio(16, r) if canonical else r).loss.mean().backward()
    return compiled_graphs() - before


def test_one_graph_per_kept_token_count():
    # 8, 16 and 11 tokens kept. (torch 2.13 leaves float arguments unspecialised and so guards on
    # the count by itself; versions that specialise floats would compile once per ratio without the
    # canonical ratio, which makes the count the only thing a graph depends on either way.)
    assert _graphs_for(RATIOS, canonical=True) == 3
    assert _graphs_for([0.5, 0.0, 0.5, 0.0], canonical=True) == 2


def test_compiled_training_module_matches_eager():
    eager, compiled = _module(), _module()
    run_compiled = torch.compile(compiled, backend="aot_eager")
    z, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for r in (0.5, 0.0):
        outs = []
        for net in (eager, run_compiled):
            torch.manual_seed(7)  # sigma, noise, mask and label drop from the global RNG
            out = net(z, y, canonical_mask_ratio(16, r))
            out.loss.mean().backward()
            outs.append(out.loss.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.timeout(600)
def test_a_compiled_two_rank_run_compiles_once_per_token_count_and_trains_like_eager(digits8, tmp_path):
    common = dict(run={"total_steps": 12}, phases={"mask_ratio": 0.5, "unmask_every": 6, "unmask_steps": 2},
                  monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4, "sample_steps": 2})
    configs = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = tiny_config(digits8, str(tmp_path / name), model={"name": "MaskDiT-S/2", "skip": True,
                                                               "compile": compile_, "compile_backend": "aot_eager",
                                                               "options": TINY}, **common)
        configs.append(write_config(cfg, tmp_path / f"{name}.yaml"))
    # both runs, one after the other, in the ranks of one launch (start-up is most of their time)
    proc = run(train_each_command(configs, free_port()), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = dict(zip(("eager", "compiled"), runs_in(proc.stdout)))
    lines = re.findall(r"torch\.compile: (\d+) graphs after step (\d+) \(new: mask ratio ([\d.]+), (\d+) of 16",
                       out["compiled"])
    # steps 1-4 masked (8 of 16 tokens), 5-6 unmasked, 7-10 masked again, 11-12 unmasked: two graphs
    assert lines == [("1", "1", "0.5", "8"), ("2", "5", "0", "16")], lines
    assert "torch.compile" not in out["eager"]
    eager, compiled = losses(out["eager"]), losses(out["compiled"])
    assert sorted(compiled) == list(range(1, 13))
    for step in compiled:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4, abs=1e-6), (step, compiled[step], eager[step])


def test_a_continuous_schedule_is_refused_for_a_compiled_model():
    from trainer.config import ConfigError
    from trainer.config.validation import validate

    tree = {"data": {"shards": "x"}, "model": {"compile": True},
            "phases": {"mask_ratio": 0.5, "end_mask_ratio": 0.25, "schedule": "linear", "schedule_levels": 0}}
    with pytest.raises(ConfigError, match="phases.schedule_levels: 0 gives a compiled model a new token count"):
        validate(config_from_dict(tree), 1)
    validate(config_from_dict({**tree, "phases": {**tree["phases"], "schedule_levels": 8}}), 1)
