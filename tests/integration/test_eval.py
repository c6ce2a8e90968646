"""dlora eval: multiple-choice accuracy through the split path equals scoring with the full model.

Why the predictions are equal on any CPU (Intel or AMD, with or without AVX-512, arm64): a choice's
score is a mean log-probability, computed on both paths with the same float32 maths in another
summation order, so the two paths' scores differ by ~1e-6 at most. The predicted choice (argmax)
can differ only where two choices score within that of each other; the test asserts that every
item's best choice leads the next one by more than 1e-3, so the comparison is exact on any CPU.
"""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from edge_client.app.cli import main as dlora
from edge_client.app.evaluate import Item, evaluate
from edge_client.remote.link import CloudLink, LinkConfig
from edge_client.remote.remote_step import RemoteStack
from edge_client.train.model_parts import EdgeModel

ITEMS = [Item("Q: 2+2=", [" 4", " 5", " twenty-two"], 0), Item("The sky is", [" blue", " green"], 1),
         Item("A cat says", [" meow", " woof", " moo", " quack"], 0)]


MARGIN = 1e-3  # least lead of the best choice's score; 1000x float32's error on a score


def _full_model_predictions(model_dir, items):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    edge = EdgeModel(model_dir)
    preds = []
    for item in items:
        p = edge.tokenizer(item.prompt)["input_ids"]
        scores = []
        for c in item.choices:
            ids = p + edge.tokenizer(c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            n = len(ids) - len(p)
            scores.append(float(torch.stack([logp[i - 1, ids[i]] for i in range(len(p), len(ids))]).sum() / n))
        best, second = sorted(scores, reverse=True)[:2]
        assert best - second > MARGIN, f"{item.prompt!r}: choices within {best - second:.2g}; the argmax would be fragile"
        preds.append(int(torch.tensor(scores).argmax()))
    return preds


def test_split_scores_equal_full_model(tiny_dir, cloud):
    model_dir = tiny_dir("gpt2")
    edge = EdgeModel(model_dir)
    link = CloudLink(LinkConfig(address=cloud(model_dir), codec_up="float32", codec_down="float32"), edge)
    link.open()
    res = evaluate(edge, RemoteStack(link), ITEMS, progress=False, items_per_batch=2)
    link.close()
    assert res.predictions == _full_model_predictions(model_dir, ITEMS)
    assert res.total == 3 and res.accuracy == sum(p == i.answer for p, i in zip(res.predictions, ITEMS)) / 3


def test_eval_cli_with_data_and_with_tasks(tiny_dir, cloud, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    address = cloud(model_dir)
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": i.prompt, "choices": i.choices, "answer": i.answer}) for i in ITEMS))
    assert dlora(["eval", "--cloud", address, "--model", str(model_dir), "--data", str(data), "--json",
                  str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert "mc" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["total"] == 3
    assert dlora(["eval", "--cloud", address, "--model", str(model_dir), "--tasks", "piqa,sst2", "--limit", "4",
                  "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "t.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "sst2" in out and "mean" in out
    assert set(json.loads((tmp_path / "t.json").read_text())) == {"piqa", "sst2"}
    assert dlora(["eval", "--cloud", address, "--model", str(model_dir), "--no-progress"]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    # a codec per direction, as in train
    assert dlora(["eval", "--cloud", address, "--model", str(model_dir), "--data", str(data), "--wire-up", "int8",
                  "--wire-down", "bfloat16", "--int8-block-size", "64", "--json", str(tmp_path / "w.json"),
                  "--no-progress"]) == 0
    assert json.loads((tmp_path / "w.json").read_text())["total"] == 3
    capsys.readouterr()
    assert dlora(["eval", "--cloud", address, "--model", str(model_dir), "--data", str(data), "--int8-block-size", "0",
                  "--no-progress"]) == 2
    assert "--int8-block-size=0: must be >= 1" in capsys.readouterr().err


def test_an_adapter_scores_the_same_through_either_protocol(tiny_dir, cloud, tmp_path):
    """An adapter with non-zero B, applied on the device (layerwise) or on the cloud (adapter): the final hidden
    states agree to float32 round-off, they differ from the base model's, and `dlora eval --adapter` predicts the
    same. Not bit for bit: the wire carries x (or the weights) exactly and both sides run the same operations,
    but in two processes on buffers of other alignment, so BLAS may pick other kernels that sum a dot product
    in another order: ~1e-7 relative per sum, a few ulps after the layers above (asserted: rtol 1e-5 plus
    1e-6 of the largest value; a missing or doubled delta moves them by ~1e-1)."""
    from common.pb.dlora.v1 import dlora_pb2 as pb
    from edge_client.train.lora import LoraAdapter

    model_dir = tiny_dir("llama")
    address = cloud(model_dir)
    edge = EdgeModel(model_dir, ("q_proj", "v_proj"))
    adapter = LoraAdapter(edge, 4, 8.0, 0.0, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pair in adapter.pairs:
            pair.B.copy_(0.5 * torch.randn(pair.B.shape, generator=gen))
    adapter.save(tmp_path / "adapter")
    ids = torch.tensor([edge.tokenizer("The cat sat on the mat.")["input_ids"]])
    emb, mask = edge.embed(ids), torch.ones_like(ids)
    hidden = {}
    for protocol, lora in (("layerwise", adapter), ("adapter", adapter), ("base", None)):
        link = CloudLink(LinkConfig(address=address, codec_up="float32", codec_down="float32",
                                    protocol="adapter" if protocol == "adapter" else "layerwise"), edge, lora=lora)
        link.open()
        roles = [pb.FORWARD if lora is not None else pb.ABSENT] * edge.num_layers
        hidden[protocol] = RemoteStack(link, lora).forward(emb, mask, roles)
        link.close()
    torch.testing.assert_close(hidden["adapter"], hidden["layerwise"], rtol=1e-5,
                               atol=1e-6 * float(hidden["layerwise"].abs().max()))
    assert not torch.allclose(hidden["adapter"], hidden["base"], atol=1e-3)
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": i.prompt, "choices": i.choices, "answer": i.answer}) for i in ITEMS))
    results = {}
    for protocol in ("layerwise", "adapter"):
        out = tmp_path / f"{protocol}.json"
        assert dlora(["eval", "--cloud", address, "--model", str(model_dir), "--data", str(data), "--adapter",
                      str(tmp_path / "adapter"), "--protocol", protocol, "--json", str(out), "--no-progress"]) == 0
        results[protocol] = json.loads(out.read_text())
    assert results["adapter"] == results["layerwise"]
