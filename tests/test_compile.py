"""torch.compile of the training step (`train.compile`, `raysys train --compile MODE`): the compiled step computes
what the eager step computes, and what is checkpointed is the plain model.

The tests compile with torch.compile's aot_eager backend: Dynamo and AOTAutograd trace forward and backward exactly
as for the inductor modes, in ~9 s; inductor's code generation takes ~150 s for InceptionV3 on 2 CPU cores
(benchmarks/train_throughput.py --compile, README)."""

import copy

import pytest
import torch
from test_model import SIZE, _batches

from raysys.config import Config
from raysys.engine import WeightedBCE, compile_step, train_one_epoch
from raysys.model import build_model, load_checkpoint, save_checkpoint


def test_a_compiled_training_step_trains_like_the_eager_one_and_checkpoints_the_plain_model(tmp_path):
    torch.manual_seed(0)
    eager = build_model(image_size=SIZE).to(memory_format=torch.channels_last)  # as raysys.train
    plain = copy.deepcopy(eager)
    compiled = compile_step(plain, "aot_eager")
    batches = list(_batches(n_batches=3))
    cpu = torch.device("cpu")
    torch.manual_seed(1)  # the same dropout masks on both sides
    expected = train_one_epoch(eager, batches, torch.optim.Adam(eager.parameters(), lr=1e-3), WeightedBCE(), cpu)
    torch.manual_seed(1)
    got = train_one_epoch(compiled, batches, torch.optim.Adam(plain.parameters(), lr=1e-3), WeightedBCE(), cpu)
    assert got["train_steps"] == expected["train_steps"] == 3 and got["first_step_seconds"] > 0
    assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)
    for (name, a), b in zip(eager.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), name  # three Adam steps from the same gradients
    for (name, a), b in zip(eager.named_buffers(), plain.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4), name  # BatchNorm statistics moved alike

    checkpoint = save_checkpoint(tmp_path / "ck", compiled, config=Config().to_dict(), epoch=1, metrics={})
    loaded = load_checkpoint(checkpoint).model
    assert loaded.state_dict().keys() == eager.state_dict().keys()  # no torch.compile prefix in the keys
    for name, tensor in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name  # every weight and statistic, as trained
