"""2-rank CPU training through the real deepspeed launcher (gloo): ZeRO stages against plain data
parallelism, resume after SIGKILL, two 'nodes' on loopback, ZeRO-3 consolidation and export."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoints import COMPLETE, STATE_FILE, export_weights, network_weights
from trainer.sample.loading import load_model

from launcher import deepspeed_command, free_port, kill_group, losses, run, start, tiny_config, wait_for, write_config

pytestmark = pytest.mark.timeout(900)


def state_of(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_the_same_weights_as_plain_data_parallelism(stage, zero_stage_runs, tmp_path):
    """At stage 0 the replicas' own weights can drift apart, so their checksums must agree. At
    stages 1-3 they agree by construction (each rank updates its partition, then all gather), so
    that check cannot see a rank whose partition was updated with its local gradient instead of the
    reduced one; what can is the result: the same weights as stage 0 trains on the same data
    (reduction order aside: measured 2e-5 at most after 30 steps; such a fault moves weights by
    about lr = 2e-3 per step). The runs: conftest's zero_stage_runs (stage 0 is plain data
    parallelism: every rank applies the all-reduced gradient to its own full copy)."""
    ckpt, stage0_run = zero_stage_runs[stage], zero_stage_runs[0]
    sums = state_of(ckpt)["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    live, _ = network_weights(str(ckpt), "model")
    plain, _ = network_weights(str(stage0_run), "model")
    assert set(live) == set(plain)
    worst = max(float((live[k] - plain[k]).abs().max()) for k in live)
    assert worst < 2e-4, (stage, worst)
    if stage == 3:
        # ZeRO-3 consolidation: the exported live weights equal the EMA (decay ~0 tracks them) and
        # both reload into a plain network that gives the same outputs.
        model_file, ema_file = tmp_path / "model.safetensors", tmp_path / "ema.safetensors"
        export_weights(str(ckpt), str(model_file), "model")
        export_weights(str(ckpt), str(ema_file), "ema")
        live, ema = load_file(model_file), load_file(ema_file)
        assert set(live) == set(ema)
        for k in live:
            torch.testing.assert_close(live[k], ema[k], rtol=1e-4, atol=1e-5)
        loaded_a, loaded_b = load_model(str(model_file)), load_model(str(ema_file))
        assert (loaded_a.model_name, loaded_a.step, loaded_a.weights) == ("MaskDiT-S/2", 30, "model")
        net_a, net_b = loaded_a.denoiser.net, loaded_b.denoiser.net
        x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 1, 10])
        with torch.no_grad():
            torch.testing.assert_close(net_a(x, t, y).sample, net_b(x, t, y).sample, rtol=1e-4, atol=1e-5)
            assert net_a(x, t, y).sample.abs().sum() > 0  # trained, not the zero-initialised output


def test_sigkill_then_same_command_resumes_on_the_same_path(vae_digits8, tmp_path):
    """Kill -9 after the step-10 checkpoint; rerunning the same command continues from step 10 and
    logs the same per-step losses as a run that was never interrupted, and ends with the same EMA.
    The data are VAE posterior moments with mirrored copies, so the resumed stream must also draw
    the same posterior noise and flips; the EMA updates every other step."""
    common = dict(run={"total_steps": 20}, monitor={"log_every": 1, "peak_tflops": 1.0, "sample_count": 4,
                                                    "sample_steps": 4},
                  checkpoint={"every": 10}, phases={"mask_ratio": 0.5, "unmask_every": 8, "unmask_steps": 3},
                  ema={"decay": 0.9, "update_every": 2})
    ref_cfg = write_config(tiny_config(vae_digits8, str(tmp_path / "ref"), **common), tmp_path / "ref.yaml")
    reference = run(deepspeed_command(ref_cfg, free_port()), tmp_path)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    cfg = write_config(tiny_config(vae_digits8, str(tmp_path / "kill"), **common), tmp_path / "kill.yaml")
    # the first run hangs in step 12 (one micro-step per step), so it can never race past the step-20
    # checkpoint between the poll that sees step 10 and the kill (seen once in CI)
    first = start(deepspeed_command(cfg, free_port()), tmp_path, tmp_path / "first.log",
                  extra_env={"MDT_FAULTS": "hang:call=12"})
    wait_for(tmp_path / "kill" / "t" / "checkpoints" / "step00000010" / COMPLETE, first)
    kill_group(first)
    again = run(deepspeed_command(cfg, free_port()), tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 10" in again.stdout
    assert "optimizer state: Adam step 10" in again.stdout  # the Adam moments and step came back
    ref, resumed = losses(reference.stdout), losses(again.stdout)
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-7), (step, resumed[step], ref[step])
    # the EMA came back with the weights: 10 updates in 20 steps, the same average at the end
    ends = [tmp_path / name / "t" / "checkpoints" / "step00000020" for name in ("ref", "kill")]
    assert [state_of(c)["ema_updates"] for c in ends] == [10, 10]
    ema_ref, ema_resumed = load_file(ends[0] / "ema.safetensors"), load_file(ends[1] / "ema.safetensors")
    assert set(ema_ref) == set(ema_resumed)
    for key in ema_ref:
        torch.testing.assert_close(ema_resumed[key], ema_ref[key], rtol=1e-5, atol=1e-7, msg=key)


def test_two_nodes_on_loopback_train_together(digits8, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    cfg = write_config(tiny_config(digits8, str(tmp_path / "runs"), run={"total_steps": 10}), tmp_path / "c.yaml")
    port = free_port()
    procs = []
    for node in (0, 1):
        args = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
        procs.append(start(deepspeed_command(cfg, port, launcher_args=args), tmp_path, tmp_path / f"node{node}.log"))
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    state = state_of(tmp_path / "runs" / "t" / "checkpoints" / "step00000010")
    assert state["world_size"] == 2
    assert state["replica_checksums"][0] == state["replica_checksums"][1]
    assert sorted(losses(logs[0])) == [5, 10]
