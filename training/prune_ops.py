"""Structured pruning of Llama-family causal LMs: importance scores on calibration text, then real slicing.

Both operations return a new, smaller model (a new config + sliced weights), never masks:
- `drop_layers`: the decoder layers whose output is most like their input (mean cosine similarity of
  the hidden state entering and leaving the layer, over calibration tokens) are removed;
- `shrink_mlp`: every MLP keeps its `intermediate_size` most important channels (rows of gate/up,
  columns of down), importance = mean |act(gate)*up| over calibration tokens x ||down_proj column||.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class PrunePlan:
    """How much each method removes: whole layers, and the MLP width left in every kept layer."""

    num_layers_removed: int
    intermediate_size: int


def check_supported(model) -> None:
    """Refuse models whose layers are not Llama-style decoder layers (self_attn + gated mlp)."""
    model_type = getattr(model.config, "model_type", "?")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or layers is None or not hasattr(layers[0].mlp, "gate_proj"):
        raise ValueError(f"model.path: a {model_type} model cannot be pruned; training.prune handles Llama-family "
                         f"causal LMs ({', '.join(SUPPORTED_MODEL_TYPES)}) with gated MLPs")


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings count once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def plan_pruning(*, total_params: int, num_layers: int, hidden_size: int, intermediate_size: int, layer_params: int,
                 methods: list[str], param_fraction: float | None, num_layers_to_remove: int | None,
                 layer_share: float, width_multiple: int) -> PrunePlan:
    """Turn the target (a fraction of all parameters, or a layer count) into layers to drop and a new MLP width.

    With both methods, `layer_share` of the parameters to remove comes from whole layers (rounded to
    whole layers) and the rest from MLP channels, spread evenly over the kept layers (a gated MLP
    channel costs 3 x hidden_size weights); the width is rounded to `width_multiple`."""
    if num_layers_to_remove is not None:
        if num_layers_to_remove >= num_layers:
            raise ValueError(f"prune.num_layers: {num_layers_to_remove} would remove every layer of a "
                             f"{num_layers}-layer model; remove at most {num_layers - 1}")
        return PrunePlan(num_layers_to_remove, intermediate_size)
    to_remove = param_fraction * total_params
    dropped = 0
    if "layers" in methods:
        share = layer_share if "mlp_width" in methods else 1.0
        dropped = min(num_layers - 1, int(round(share * to_remove / layer_params)))
    width = intermediate_size
    if "mlp_width" in methods:
        left = max(0.0, to_remove - dropped * layer_params)
        channels = left / (3 * hidden_size * (num_layers - dropped))
        width = int(round((intermediate_size - channels) / width_multiple)) * width_multiple
        if width < width_multiple:
            raise ValueError(f"prune.param_fraction: {param_fraction} leaves no MLP channels (width "
                             f"{intermediate_size - channels:.0f}); lower it or let layers take a larger share")
        width = min(width, intermediate_size)
    return PrunePlan(dropped, width)


def _batches(blocks: torch.Tensor):
    for start in range(0, blocks.shape[0], CALIBRATION_BATCH):
        yield blocks[start:start + CALIBRATION_BATCH]


def layer_similarity(model, blocks: torch.Tensor) -> list[float]:
    """Per decoder layer: mean cosine similarity of its input and output hidden states over all tokens of `blocks`."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)
            sums[index] += cos.double().sum()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = _calibration_pass(model, blocks, handles)
    return (sums / count).tolist()


def _calibration_pass(model, blocks: torch.Tensor, handles) -> int:
    """Run the calibration blocks through the model with the given hooks attached, then remove them;
    returns the number of tokens seen."""
    count = 0
    try:
        with torch.inference_mode():
            for batch in _batches(blocks):
                model(input_ids=batch, use_cache=False)
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return count


def channel_importance(model, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder layer, one score per MLP channel: mean |act(gate)*up| (down_proj's input) x ||down column||."""
    layers = model.model.layers
    sums = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]

    def hook(index):
        def record(module, args):
            sums[index] += args[0].detach().abs().double().reshape(-1, args[0].shape[-1]).sum(0)
        return record

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    count = _calibration_pass(model, blocks, handles)
    return [(s / count) * layer.mlp.down_proj.weight.detach().double().norm(dim=0)
            for s, layer in zip(sums, layers)]


def least_changing_layers(similarity: list[float], n: int) -> list[int]:
    """The `n` layers with the highest input/output similarity (ties: the later layer first), sorted."""
    ranked = sorted(range(len(similarity)), key=lambda i: (-similarity[i], -i))
    return sorted(ranked[:n])


def top_channels(scores: list[torch.Tensor], width: int) -> list[torch.Tensor]:
    """Per layer, the indices (ascending) of the `width` highest-scoring channels."""
    return [torch.sort(torch.topk(s, width).indices).values for s in scores]


def _rebuilt(model, config, state: dict):
    """A model of `model`'s class built from `config`, holding exactly `state` (strict: nothing left out)."""
    new = type(model)(config)
    missing, unexpected = new.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight is the embedding's tensor, absent from some state dicts.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"sliced weights do not fit the new config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        new.tie_weights()
    return new.to(next(model.parameters()).dtype).eval()


_LAYER_KEY = re.compile(r"^(?P<head>.*\.layers\.)(?P<index>\d+)\.(?P<tail>.*)$")


def drop_layers(model, remove: list[int]):
    """A new model without the decoder layers `remove` (indices of `model`); the rest keep their order."""
    num_layers = model.config.num_hidden_layers
    keep = [i for i in range(num_layers) if i not in set(remove)]
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = value
        elif int(match["index"]) in new_index:
            state[f"{match['head']}{new_index[int(match['index'])]}.{match['tail']}"] = value
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    return _rebuilt(model, config, state)


def shrink_mlp(model, keep: list[torch.Tensor]):
    """A new model whose every MLP has only the channels `keep[layer]`: rows of gate/up, columns of down."""
    widths = {len(k) for k in keep}
    if len(widths) != 1:
        raise ValueError(f"every layer must keep the same number of MLP channels (config has one intermediate_size); got {widths}")
    state = {}
    for key, value in model.state_dict().items():
        match = _LAYER_KEY.match(key)
        tail = match["tail"] if match else ""
        if tail.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            value = value[keep[int(match["index"])]]
        elif tail == "mlp.down_proj.weight":
            value = value[:, keep[int(match["index"])]]
        state[key] = value.clone()
    config = copy.deepcopy(model.config)
    config.intermediate_size = widths.pop()
    return _rebuilt(model, config, state)
