"""The fastest an adapter-protocol step could be over a link, beside what `dlora bench` measured.

Usage: python bench/adapter_bound.py BENCH_JSON --wan 10ms,100mbit

A model of the schedule, per M: the split computes what local-train computes (C, local-train's step
time measured alongside; two processes on the same cores cannot beat it), and whatever overlap
micro-batches give, five transfers stay on the critical path, each paying its bytes at RATE plus
the one-way DELAY:
1. the first layer's weights and the first micro-batch's embeddings, up, before any layer can run (the
   other layers' weights follow the first StepBegin and cross while the layers below compute);
2. the last micro-batch's final hidden states, down, before its head can run;
3. its dL/dh, up, before its backward can start;
4. the lowest trained layer's gradients, down, after the last backward (the layers above stream
   theirs while the layers below run their backward: LoraGrads goes layer by layer).
bound(M) = C + (W_low + n·E·c)/R + 2·n·E_out·c/R + G_low/R + 4·DELAY, with n = N/M tokens per
micro-batch, W_low and G_low the lowest trained layer's weights and gradients.
Everything else overlaps compute or other transfers in the best case; nothing here is measured
but C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config import TrainConfig, field_default  # noqa: E402
from common.wire.adapter import AdapterLayout  # noqa: E402
from common.wire.cost import tensor_bytes  # noqa: E402
from edge_client.tools.link_emulator import parse_wan  # noqa: E402
from edge_client.train.model_parts import EdgeModel  # noqa: E402


def bound(c: float, tokens: int, m: int, embed: int, weights_low_b: int, grads_low_b: int, codec: str, block: int,
          rate_up: float, rate_down: float, delay: float) -> float:
    n = tokens // m
    act = tensor_bytes(n * embed, codec, block)
    return c + (weights_low_b + act) / rate_up + act / rate_down + act / rate_up + grads_low_b / rate_down + 4 * delay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--wan", required=True, help="the link the bench ran on, e.g. 10ms,100mbit")
    args = ap.parse_args()
    data = json.loads(args.bench_json.read_text())
    meta, rows = data["meta"], data["rows"]
    delay, rate_up, rate_down = parse_wan(args.wan)
    edge = EdgeModel(Path(meta["model"]), tuple(meta["targets"]))
    rank = field_default(TrainConfig, "rank")  # the bench trains at the default rank
    layout = AdapterLayout(edge.num_layers, rank, tuple((t.in_features, t.out_features) for t in edge.targets
                                                        if t.layer == 0))
    per_layer = layout.total_numel(range(layout.per_layer))  # elements of one layer's modules
    hidden = edge.embed_width
    tokens = int(meta["batch_size"]) * int(meta["seq_len"])
    wbytes = 4 if meta.get("weights_wire", "float32") == "float32" else 2
    print(f"{meta['link']}; {meta['date']}; weights {meta.get('weights_wire', 'float32')}")
    print("| M | wire | budget | measured s | local-train alongside s | x local | bound s | bound x local |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("protocol") != "adapter":
            continue
        codec = r["wire"].split("/")[0]
        trained = r["active"]
        b = bound(r["local_step_s"], tokens, r["micro_batches"], hidden, per_layer * wbytes, per_layer * wbytes,
                  codec, 4096, rate_up, rate_down, delay)
        print(f"| {r['micro_batches']} | {r['wire']} | {trained}/{r['layers']} | {r['median_step_s']:.3f} "
              f"| {r['local_step_s']:.3f} | {r['ratio']:.2f} | {b:.3f} | {b / r['local_step_s']:.2f} |")


if __name__ == "__main__":
    main()
