"""Hidden-state features of Hugging Face causal LMs for CLReg and RMU.

* :func:`decoder_layers` finds the decoder blocks of a model (``model.model.layers`` for LLaMA,
  Mistral, Qwen, ...; ``transformer.h`` for GPT-2; ``gpt_neox.layers`` ...).
* :class:`LayerFeatures` (made by :func:`capture_layer`) is a context manager that records the
  output of chosen decoder layers during a forward pass and, when asked, stops the forward right
  after the deepest of them, so a features-only pass skips the later layers and the LM head.
* :func:`pool_features` turns (B, T, D) hidden states plus a (B, T) token mask into (rows, D)
  features with per-concept or per-sequence labels: a masked mean or the last masked token per
  sequence, or one row per masked token (token-level CLReg).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

POOLINGS = ("mean", "last", "token")
LABEL_BY = ("concept", "sequence")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted features exist (never escapes)."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks of a causal LM (unwrapping DDP/compile wrappers)."""
    root = model
    for attr in ("module", "_orig_mod"):  # DDP, torch.compile
        while hasattr(root, attr) and isinstance(getattr(root, attr), nn.Module):
            root = getattr(root, attr)
    candidates = []
    get_decoder = getattr(root, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # some models raise when they have no separate decoder
            pass
    for path in ("model", "transformer", "gpt_neox", "model.decoder", "model.language_model"):
        obj = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            candidates.append(obj)
    candidates.append(root)
    for module in candidates:
        for name in ("layers", "h", "blocks", "layer"):
            layers = getattr(module, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    # Last resort: the largest ModuleList whose length is the configured depth.
    depth = getattr(getattr(root, "config", None), "num_hidden_layers", None)
    best = None
    for sub in root.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 0 and (depth is None or len(sub) == depth):
            if best is None or len(sub) > len(best):
                best = sub
    if best is None:
        raise ValueError(
            f"could not find the decoder layers of {type(root).__name__}; expected an "
            "nn.ModuleList such as model.model.layers or model.transformer.h"
        )
    return best


def resolve_layer(model: nn.Module, layer: int, *, clamp: bool = False) -> int:
    """A decoder layer index in ``[0, depth)``; negative indices count from the last layer.

    With ``clamp=True`` an index past the end is clamped to the last layer (RMU's default layer
    7 on a 4-layer model means layer 3); otherwise it is a ValueError.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    depth = len(decoder_layers(model))
    index = layer + depth if layer < 0 else layer
    if clamp and index >= depth:
        index = depth - 1
    if not 0 <= index < depth:
        raise ValueError(f"layer {layer} is out of range for a model with {depth} decoder layers")
    return index


class LayerFeatures:
    """Context manager recording decoder-layer outputs during forward passes.

    ``features[layer]`` holds the (B, T, D) output of that layer from the latest forward inside
    the ``with`` block. With ``stop=True`` the forward ends right after the deepest captured
    layer: a forward pre-hook on the next decoder layer (or the final norm) raises a private
    exception, which ``run`` catches. The stop fires *before* the next block starts, outside its
    gradient-checkpoint region and before any FSDP pre-forward hook (the hook is prepended), so
    neither sees a half-run block. Hooks are removed when the block exits, so a backward-pass
    recomputation under gradient checkpointing neither records nor stops.
    """

    def __init__(self, model: nn.Module, layers: Union[int, Iterable[int]], stop: bool = False):
        self.model = model
        wanted = [layers] if isinstance(layers, int) else list(layers)
        if not wanted:
            raise ValueError("layers must name at least one decoder layer")
        self.layers = sorted({resolve_layer(model, layer) for layer in wanted})
        self.stop = stop
        self.features: Dict[int, torch.Tensor] = {}
        self._handles = []

    def _stop_module(self) -> Optional[nn.Module]:
        """The module that runs right after the deepest captured layer, if we can name it."""
        blocks = decoder_layers(self.model)
        deepest = self.layers[-1]
        if deepest + 1 < len(blocks):
            return blocks[deepest + 1]
        # After the last block only the final norm and the LM head remain; stop at the norm
        # when the decoder exposes one, otherwise let the forward finish.
        root = self.model.module if hasattr(self.model, "module") else self.model
        decoder = root.get_decoder() if callable(getattr(root, "get_decoder", None)) else None
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            module = getattr(decoder, name, None) if decoder is not None else None
            if isinstance(module, nn.Module):
                return module
        return None

    def __enter__(self) -> "LayerFeatures":
        blocks = decoder_layers(self.model)
        for index in self.layers:
            def record(_module, _inputs, output, index=index):
                self.features[index] = output[0] if isinstance(output, (tuple, list)) else output

            self._handles.append(blocks[index].register_forward_hook(record))
        if self.stop:
            stop_at = self._stop_module()
            if stop_at is not None:
                def halt(_module, _inputs):
                    if all(index in self.features for index in self.layers):
                        raise _StopForward()

                self._handles.append(stop_at.register_forward_pre_hook(halt, prepend=True))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def run(self, *args, **kwargs):
        """Call the model; returns its output, or None when the forward was stopped early."""
        self.features.clear()
        try:
            return self.model(*args, **kwargs)
        except _StopForward:
            return None

    def __getitem__(self, layer: int) -> torch.Tensor:
        index = resolve_layer(self.model, layer)
        if index not in self.features:
            raise KeyError(f"layer {layer} was not captured (did the forward run?)")
        return self.features[index]


def capture_layer(model: nn.Module, layer: Union[int, Sequence[int]], stop: bool = False
                  ) -> LayerFeatures:
    """``with capture_layer(model, -1, stop=True) as cap: cap.run(input_ids=...); h = cap[-1]``."""
    return LayerFeatures(model, layer, stop=stop)


def layer_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        layer: int) -> torch.Tensor:
    """(B, T, D) output of decoder ``layer``; the forward stops after that layer."""
    with capture_layer(model, layer, stop=True) as cap:
        cap.run(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return cap[layer]


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def pool_features(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "mean",
    concept_ids: Optional[torch.Tensor] = None,
    label_by: str = "concept",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) hidden states and a (B, T) token mask -> ((rows, D) features, (rows,) labels).

    Args:
        hidden: (B, T, D) hidden states.
        mask: (B, T) bool mask of the tokens to pool (usually the answer tokens).
        mode: "mean" (masked mean per sequence, B rows), "last" (the last masked token of each
            sequence, B rows) or "token" (every masked token, ``mask.sum()`` rows, in row-major
            order).
        concept_ids: (B,) integer concept id per sequence; None puts every sequence in concept 0.
        label_by: "concept" labels each row with its sequence's concept id; "sequence" with the
            sequence's index in the batch (with "token" pooling the tokens of one answer are then
            each other's positives).

    Returns:
        ``(features, labels)``: features in the dtype of ``hidden``, labels int64 on its device.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a (B, T, D) tensor, got {_describe(hidden)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (B, T) to match hidden, "
                         f"got {_describe(mask)}")
    if mode not in POOLINGS:
        raise ValueError(f"mode must be one of {POOLINGS}, got {mode!r}")
    if label_by not in LABEL_BY:
        raise ValueError(f"label_by must be one of {LABEL_BY}, got {label_by!r}")
    batch = hidden.shape[0]
    device = hidden.device
    mask = mask.to(device=device, dtype=torch.bool)
    if concept_ids is None:
        concept_ids = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        if not isinstance(concept_ids, torch.Tensor) or concept_ids.shape != (batch,):
            raise ValueError(f"concept_ids must be a ({batch},) tensor, got {_describe(concept_ids)}")
        if concept_ids.dtype.is_floating_point or concept_ids.dtype == torch.bool:
            raise TypeError(f"concept_ids must be an integer tensor, got {concept_ids.dtype}")
        concept_ids = concept_ids.to(device=device, dtype=torch.long)
    seq_labels = concept_ids if label_by == "concept" else torch.arange(batch, device=device)

    counts = mask.sum(dim=1)
    if mode != "token" and bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"mask selects no token in sequence(s) {empty}; {mode!r} pooling needs "
                         "at least one token per sequence")
    if mode == "mean":
        # Accumulate in float32 so a long bf16 answer does not lose precision in the sum.
        weights = mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * weights).sum(dim=1) / counts.to(torch.float32).unsqueeze(-1)
        return pooled.to(hidden.dtype), seq_labels
    if mode == "last":
        positions = torch.arange(hidden.shape[1], device=device).expand_as(mask)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)
        return hidden[torch.arange(batch, device=device), last], seq_labels
    rows, _ = torch.nonzero(mask, as_tuple=True)
    return hidden[mask], seq_labels[rows]
