"""A step's weights layer by layer (StepWeights.more): the first layer's before the StepBegin, the rest after it.

The cloud starts the micro-batch at once and a layer waits until its own weights are in: the stream's
cache may still hold the previous step's values of the layers above, and using those would be wrong
without any error (the golden test caught it at random, depending on thread timing; here a pause before
the second layer's weights makes it certain). Continuations that break the rule (one layer per message,
layers ascending, the same micro-batch count, train flag and trained modules) are INVALID_ARGUMENT; a
present layer whose weights the step's last message left out is the micro-batch's INVALID_ARGUMENT; a
layer whose weights never come ends the session at --step-timeout. Driven by hand over a real cloud in
this process (tests/raw_stream.py), with test_adapter_errors.py's helpers.
"""

# ruff: noqa: F811 - the tests take test_adapter_errors.py's adapter_cloud fixture, imported below, as an argument
from __future__ import annotations

import time

import grpc
import pytest
import torch
from raw_stream import raw_channel, start_cloud
from test_adapter_errors import (  # noqa: F401 - adapter_cloud is a fixture
    FB,
    FWD,
    LAYOUT,
    N,
    adapter_cloud,
    hidden_grad,
    session,
    step_answers,
    step_begin,
    step_error,
    weights,
)

from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs

L0, L1 = [0, 1], [2, 3]  # the modules of layer 0 and of layer 1 (P = 2 targets)


def chunk(step: int, modules: list[int], flat: torch.Tensor, more: bool, *, train: bool = False,
          trained: list[int] | None = None, micro_batches: int = 1) -> pb.StepWeights:
    return pb.StepWeights(step=step, micro_batches=micro_batches, train=train, modules=modules,
                          trained=trained or [], weights=codecs.encode(flat, "float32"), more=more)


def split_flat(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All four modules' weights of `seed`, and their layer-0 and layer-1 parts."""
    flat = weights(list(range(N)), seed)
    n0 = LAYOUT.total_numel(L0)
    return flat, flat[:n0], flat[n0:]


def hidden_of(s, step: int) -> torch.Tensor:
    reply = s.recv()
    assert reply.WhichOneof("kind") == "hidden", reply
    return codecs.decode(reply.hidden.hidden, "Hidden", (2, 3, 32), "float32")


def test_a_layer_waits_for_this_steps_weights_not_the_cached_ones(adapter_cloud):
    """Step 0 puts seed-0 weights in the stream's cache; step 1 sends seed-1 weights layer by layer with a
    0.3 s pause before layer 1's, which the micro-batch reaches long before that: its hidden states equal
    those of a fresh stream given the seed-1 weights in one message (same operations on the same numbers; up
    to the summation order a BLAS may pick for a received buffer's alignment: rtol 1e-5 + 1e-6 of the largest
    value), and are not within 1e-3 of step 0's (other weights)."""
    model_dir, server = adapter_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = session(channel, model_dir)
    old, _, _ = split_flat(0)
    s.send(step_weights=chunk(0, list(range(N)), old, more=False))
    s.send(step_begin=step_begin(0, [FWD, FWD], train=False))
    h0 = hidden_of(s, 0)
    step_answers(s, 0, [])
    new, new0, new1 = split_flat(1)
    s.send(step_weights=chunk(1, L0, new0, more=True))
    s.send(step_begin=step_begin(1, [FWD, FWD], train=False))
    time.sleep(0.3)
    s.send(step_weights=chunk(1, L1, new1, more=False))
    h1 = hidden_of(s, 1)
    step_answers(s, 1, [])
    s.finish()
    fresh = session(channel, model_dir)
    fresh.send(step_weights=chunk(0, list(range(N)), new, more=False))
    fresh.send(step_begin=step_begin(0, [FWD, FWD], train=False))
    want = hidden_of(fresh, 0)
    step_answers(fresh, 0, [])
    fresh.finish()
    torch.testing.assert_close(h1, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert not torch.allclose(h1, h0, atol=1e-3)


def test_a_trained_layer_by_layer_step_returns_every_gradient(adapter_cloud):
    """Training, weights in two messages, the StepBegin between them: every module's gradient comes once."""
    model_dir, server = adapter_cloud
    s = session(raw_channel(f"127.0.0.1:{server.port}"), model_dir)
    _, w0, w1 = split_flat(2)
    trained = list(range(N))
    s.send(step_weights=chunk(0, L0, w0, more=True, train=True, trained=trained))
    s.send(step_begin=step_begin(0, [FB, FB]))
    s.send(step_weights=chunk(0, L1, w1, more=False, train=True, trained=trained))
    hidden_of(s, 0)
    s.send(hidden_grad=hidden_grad(0))
    grads = step_answers(s, 0, trained)
    assert all(bool(da.abs().sum() > 0) and bool(db.abs().sum() > 0) for da, db in grads.values())
    s.finish()


_, W0, W1 = split_flat(3)
BAD_CONTINUATIONS = {  # name -> (the continuation after chunk(0, L0, W0, more=True), words of its StepError)
    "another micro-batch count": (chunk(0, L1, W1, more=False, micro_batches=2), "other micro_batches, train or trained"),
    "another train flag": (chunk(0, L1, W1, more=False, train=True), "other micro_batches, train or trained"),
    "the same layer again": (chunk(0, L0, W0, more=False), "one layer per message, layers ascending"),
    "two layers in one continuation": (chunk(0, [1, 2], weights([1, 2]), more=True), "one layer per message"),
}


@pytest.mark.parametrize("name", list(BAD_CONTINUATIONS))
def test_a_continuation_that_breaks_the_rules_is_refused(name, adapter_cloud):
    model_dir, server = adapter_cloud
    s = session(raw_channel(f"127.0.0.1:{server.port}"), model_dir)
    s.send(step_weights=chunk(0, L0, W0, more=True))
    bad, words = BAD_CONTINUATIONS[name]
    s.send(step_weights=bad)
    assert words in step_error(s, 0).message
    s.finish()


def test_two_layers_in_a_first_message_that_announces_more_are_refused(adapter_cloud):
    model_dir, server = adapter_cloud
    s = session(raw_channel(f"127.0.0.1:{server.port}"), model_dir)
    s.send(step_weights=chunk(0, [1, 2], weights([1, 2]), more=True))
    assert "one layer per message" in step_error(s, 0).message
    s.finish()


def test_a_present_layer_the_last_message_left_out_fails_its_micro_batch(adapter_cloud):
    """A fresh stream holds nothing: layer 1 is present, and the step's last StepWeights (more unset) came
    without its weights, so the waiting layer gives up: the micro-batch's StepError names the layer."""
    model_dir, server = adapter_cloud
    s = session(raw_channel(f"127.0.0.1:{server.port}"), model_dir)
    s.send(step_weights=chunk(0, L0, W0, more=True))
    s.send(step_begin=step_begin(0, [FWD, FWD], train=False))
    s.send(step_weights=chunk(0, [], torch.empty(0), more=False))
    assert "layer 1 is present but the weights of its self_attn.q_proj were never sent" in step_error(s, 0).message
    s.finish()


def test_weights_that_never_come_end_the_session_at_step_timeout(tiny_dir, redis_url):
    """DEADLINE_EXCEEDED after --step-timeout (whichever notices first: the session loop, silent, or the
    waiting layer), and no StepError before it: nothing the device could act on."""
    model_dir = tiny_dir("llama", layers=2)
    server = start_cloud(model_dir, redis_url, step_timeout_s=1.0)
    try:
        s = session(raw_channel(f"127.0.0.1:{server.port}"), model_dir)
        s.send(step_weights=chunk(0, L0, W0, more=True))
        s.send(step_begin=step_begin(0, [FWD, FWD], train=False))
        ending = s.drain()
        assert ending.code == grpc.StatusCode.DEADLINE_EXCEEDED and not ending.replies, ending
    finally:
        server.stop(0)
