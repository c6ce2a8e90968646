"""The family table against PEFT's defaults and against the real Hugging Face modules and forward passes."""

from __future__ import annotations

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
from tiny_models import FAMILIES as TINY_FAMILIES
from tiny_models import LAYERS, save_tiny_model, tiny_config
from torch import nn
from transformers import AutoModel
from transformers.pytorch_utils import Conv1D

from common.errors import ConfigError
from common.families import FAMILIES, Family, family_of, resolve_targets, target_groups
from common.model_files import find_tensor, tensor_index

NAMES = sorted(FAMILIES)


def test_every_family_has_a_tiny_model() -> None:
    assert set(TINY_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_family_entry_is_well_formed(name: str) -> None:
    family = FAMILIES[name]
    assert family.model_type == name
    paths = family.all_paths()
    assert len(paths) == len(set(paths)), "a path is listed twice"
    assert all(group for group in family.input_groups), "an empty input group"


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_equal_peft(name: str) -> None:
    assert name in PEFT_TARGETS, f"PEFT has no default LoRA targets for {name}"
    assert FAMILIES[name].default_targets == tuple(PEFT_TARGETS[name])


@pytest.mark.parametrize("name", NAMES)
def test_paths_exist_as_linear_layers(name: str) -> None:
    family = FAMILIES[name]
    with torch.device("meta"):
        model = AutoModel.from_config(tiny_config(name))
    layers = model.get_submodule(family.layers)
    assert isinstance(layers, nn.ModuleList) and len(layers) == LAYERS
    for path in family.all_paths():
        module = layers[0].get_submodule(path)  # raises AttributeError naming the missing part
        assert isinstance(module, (nn.Linear, Conv1D)), f"{path} is a {type(module).__name__}"


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_resolve(name: str) -> None:
    family = FAMILIES[name]
    chosen = resolve_targets(family, None)
    assert chosen and set(chosen) <= set(family.all_paths())


@pytest.mark.parametrize("name", NAMES)
def test_groups_share_one_input_and_run_in_listed_order(name: str) -> None:
    """Paths of a group read the same tensor object, groups read different ones, calls follow the table.

    The edge draws LoRA dropout masks in the table's order; a wrong order would silently break the
    split-equals-PEFT guarantee.
    """
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(name)).eval()
    layer = model.get_submodule(family.layers)[0]
    calls: list[tuple[str, torch.Tensor]] = []  # holds the inputs alive, so ids cannot be reused
    handles = []
    for path in family.all_paths():

        def hook(module: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            calls.append((path, x))

        handles.append(layer.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 250, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()

    assert [p for p, _ in calls] == list(family.all_paths())
    seen = {p: id(x) for p, x in calls}
    group_ids = []
    for group in family.input_groups:
        ids = {seen[p] for p in group}
        assert len(ids) == 1, f"group {group} reads {len(ids)} different inputs"
        group_ids.append(ids.pop())
    assert len(set(group_ids)) == len(group_ids), "two groups read the same input; merge them"


@pytest.mark.parametrize(
    "name,targets,expected",
    [
        ("llama", None, ("self_attn.q_proj", "self_attn.v_proj")),
        ("llama", ["v_proj", "q_proj"], ("self_attn.q_proj", "self_attn.v_proj")),  # forward order
        ("llama", ("q_proj", "q_proj"), ("self_attn.q_proj",)),
        (
            "llama",
            ["down_proj", "gate_proj", "k_proj"],
            ("self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"),
        ),
        ("llama", ["self_attn.o_proj"], ("self_attn.o_proj",)),
        ("gpt2", None, ("attn.c_attn",)),
        ("gpt2", ["c_proj"], ("attn.c_proj", "mlp.c_proj")),
        ("gpt2", ["mlp.c_proj"], ("mlp.c_proj",)),
        ("opt", ["fc2", "out_proj"], ("self_attn.out_proj", "fc2")),
        ("bloom", None, ("self_attention.query_key_value",)),
        ("gpt_neox", ["dense", "query_key_value"], ("attention.query_key_value", "attention.dense")),
    ],
)
def test_resolve_targets(name: str, targets: list[str] | None, expected: tuple[str, ...]) -> None:
    assert resolve_targets(FAMILIES[name], targets) == expected


@pytest.mark.parametrize(
    "name,bad",
    [
        ("llama", "query_key_value"),
        ("llama", "proj"),  # a suffix must end at a dot, as in PEFT
        ("llama", "_proj"),
        ("llama", "attn.q_proj"),
        ("gpt2", "q_proj"),
        ("gpt_neox", "h_to_4h"),
        ("opt", "lm_head"),
    ],
)
def test_resolve_targets_rejects_unknown_names(name: str, bad: str) -> None:
    family = FAMILIES[name]
    with pytest.raises(ConfigError) as e:
        resolve_targets(family, [*family.default_targets, bad])  # a good name first must not hide it
    msg = str(e.value)
    assert "\n" not in msg and "--targets" in msg and repr(bad) in msg
    for path in family.all_paths():
        assert path.rsplit(".", 1)[-1] in msg, f"known name of {path} missing from: {msg}"


def test_target_groups_split_by_input_group() -> None:
    family = FAMILIES["llama"]
    chosen = resolve_targets(family, ["v_proj", "q_proj", "down_proj"])
    assert target_groups(family, chosen) == [
        ("self_attn.q_proj", "self_attn.v_proj"),
        (),
        (),
        ("mlp.down_proj",),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_family_of_known(name: str) -> None:
    assert family_of(name) is FAMILIES[name]


@pytest.mark.parametrize("bad", ["falcon", "", "LLAMA", "gpt-neox"])
def test_family_of_unknown_lists_the_supported_ones(bad: str) -> None:
    with pytest.raises(ConfigError) as e:
        family_of(bad)
    assert isinstance(e.value, ValueError)
    assert repr(bad) in str(e.value)
    for name in NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize(
    "name,param,expected",
    [
        ("gpt_neox", "lm_head.weight", ["lm_head.weight", "embed_out.weight"]),
        (
            "gpt_neox",
            "gpt_neox.layers.0.attention.dense.weight",
            ["gpt_neox.layers.0.attention.dense.weight"],
        ),
        ("gpt_neox", "lm_headx.weight", ["lm_headx.weight"]),
        ("llama", "lm_head.weight", ["lm_head.weight"]),
    ],
)
def test_stored_names(name: str, param: str, expected: list[str]) -> None:
    assert FAMILIES[name].stored_names(param) == expected


def test_gpt_neox_head_is_found_under_its_stored_alias(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A real save: the model names the head lm_head, the checkpoint stores it as embed_out."""
    folder = save_tiny_model("gpt_neox", tmp_path_factory.mktemp("neox"), layers=1)
    index = tensor_index(folder)
    family: Family = FAMILIES["gpt_neox"]
    assert "lm_head.weight" not in index
    assert find_tensor(index, family.stored_names("lm_head.weight"), "gpt_neox") == "embed_out.weight"
