"""A worker drained (SIGTERM in `dlora-cloud serve`: CloudServer.drain) finishes the step in flight, ends its
streams at the step boundary with UNAVAILABLE, refuses new ones and says DRAINING; the device continues the
same session on another worker sharing the Redis, and computes exactly what an undisturbed run computes."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from raw_stream import start_cloud

from cloud_server.cli import main as cloud_main
from common.config import TrainConfig
from common.errors import RemoteError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from edge_client.remote import split_engine
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples


@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
def test_a_drained_worker_hands_its_session_to_another(protocol, tiny_dir, redis_url, data_file, tmp_path,
                                                       monkeypatch):
    """Step 0 on worker A; A starts draining in the middle of step 1 (while the device computes its loss); step 1
    still completes there; step 2 finds the stream ended (UNAVAILABLE, "shutting down"); the device resumes the
    session on worker B (the next test: A meanwhile refuses new streams and says DRAINING). Losses and gradients
    equal those of the same three steps on B alone up to float32 round-off: the same operations on the same
    numbers, but a received tensor is used in place in its message buffer, whose alignment may make a BLAS pick
    another kernel (another summation order) on some CPUs: rel 1e-5 on the loss, rtol 1e-5 + 3e-5 of the
    largest element on each gradient (test_golden_peft.py derives these; a wrong step moves them by 1e-2 to 1)."""
    model_dir = tiny_dir("llama", layers=2)
    a, b = start_cloud(model_dir, redis_url), start_cloud(model_dir, redis_url)
    cfg = dict(model=model_dir, data=data_file, output=tmp_path, protocol=protocol, micro_batches=2,
               lora_dropout=0.1, progress=False)
    moved, alone = SplitEngine(TrainConfig(cloud=f"127.0.0.1:{a.port}", **cfg)), \
        SplitEngine(TrainConfig(cloud=f"127.0.0.1:{b.port}", **cfg))
    batches = [collate(load_examples(data_file, moved.tokenizer, 64)[i * 4:i * 4 + 4], moved.tokenizer.pad_token_id)
               for i in range(3)]
    roles = [pb.FORWARD_BACKWARD] * 2
    drained: list[int] = []
    loss_fn = split_engine.lm_loss

    def loss_that_starts_the_drain(*args, **kw):  # mid-step: between Hidden and HiddenGrad
        if moved_step[0] == 1 and not drained:
            threading.Thread(target=lambda: drained.append(a.drain(30)), daemon=True).start()
            assert a.servicer.draining.wait(5)
        return loss_fn(*args, **kw)

    moved_step = [0]
    try:
        want = []
        for step, batch in enumerate(batches):
            for p in alone.parameters():
                p.grad = None
            loss = alone.train_step(batch, step, roles)[0]
            want.append((loss, [p.grad.clone() for p in alone.parameters()]))
        monkeypatch.setattr(split_engine, "lm_loss", loss_that_starts_the_drain)
        got = []
        for step, batch in enumerate(batches):
            moved_step[0] = step
            for p in moved.parameters():
                p.grad = None
            if step == 2:
                with pytest.raises(RemoteError) as e:
                    moved.train_step(batch, step, roles)
                assert e.value.code == "UNAVAILABLE" and "shutting down" in str(e.value), e.value
                assert a.servicer.draining.is_set()
                session = moved.session_id
                moved.link.address = f"127.0.0.1:{b.port}"  # what a balancer does on the reconnect
                moved.recover()
                for p in moved.parameters():
                    p.grad = None
                assert moved.session_id == session
            loss = moved.train_step(batch, step, roles)[0]
            got.append((loss, [p.grad.clone() for p in moved.parameters()]))
        for step, ((lw, gw), (lg, gg)) in enumerate(zip(want, got)):
            assert lg == pytest.approx(lw, rel=1e-5), step
            for x, y in zip(gg, gw):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=3e-5 * float(y.abs().max()))
    finally:
        moved.close()
        alone.close()
        b.stop(0)
        if not drained:
            a.stop(0)


def test_a_draining_worker_says_so_and_refuses_new_streams(tiny_dir, redis_url):
    model_dir = tiny_dir("llama", layers=2)
    server = start_cloud(model_dir, redis_url)
    hold = SplitEngine(TrainConfig(model=model_dir, data=model_dir / "x", output=model_dir, progress=False,
                                   cloud=f"127.0.0.1:{server.port}", reply_timeout_s=30))
    done: list[int] = []
    try:
        server.servicer.draining.set()  # as drain() begins; its stop comes later
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=5).status == "DRAINING"
        assert cloud_main(["health", "--address", f"127.0.0.1:{server.port}"]) == 1  # out of a balancer's rotation
        with pytest.raises(RemoteError) as e:
            hold.link.open()  # a new stream
        assert e.value.code == "UNAVAILABLE" and "shutting down" in str(e.value)
        done.append(server.drain(10))
        assert done == [0]
    finally:
        hold.close()
        if not done:
            server.stop(0)
