"""Two streams of one session on two workers (two clouds in this process on one Redis): the newer drives the
session, the older ends with ABORTED at its next step or Kill-and-Revive report, before it runs anything.

The fence is the session's holder entry in Redis (cloud_server/slots.py): a resumed stream takes it, and
every stream checks it before each StepBegin, StepWeights and EpochReport.
"""

from __future__ import annotations

import pytest

from common.config import TrainConfig
from common.errors import RemoteError
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples


@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
def test_the_newer_stream_drives_and_the_older_is_aborted(protocol, tiny_dir, cloud, data_file, tmp_path):
    model_dir = tiny_dir("llama", layers=2)
    first, second = cloud(model_dir), cloud(model_dir)  # two workers sharing the fixture's Redis
    assert first != second

    def engine(address: str) -> SplitEngine:
        return SplitEngine(TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=address,
                                       protocol=protocol, warmup_epochs=0, budget=1, progress=False))

    old, new = engine(first), engine(second)
    batch = collate(load_examples(data_file, old.tokenizer, 64)[:4], old.tokenizer.pad_token_id)
    roles = [pb.FORWARD_BACKWARD] * 2
    try:
        old.train_step(batch, 0, roles)
        new.resume(old.session_id, None)  # the device came back through the other worker
        assert new.session_id == old.session_id
        with pytest.raises(RemoteError) as e:
            old.train_step(batch, 1, roles)
        assert e.value.code == "ABORTED" and "newer stream" in str(e.value)
        new.train_step(batch, 1, roles)
        old.recover()  # the old device reconnects: it takes the session back, and the other is fenced off
        with pytest.raises(RemoteError) as e:
            new.report_epoch(1, {0: 0.5, 1: 0.1})
        assert e.value.code == "ABORTED"
        decision = old.report_epoch(1, {0: 0.5, 1: 0.1})
        assert decision.epoch == 1 and len(decision.next_active) == 1
    finally:
        old.close()
        new.close()
