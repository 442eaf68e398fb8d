"""The recurrent state of an RWKV model as a transformers ``Cache``.

Per layer, one ``LinearAttentionLayer`` with two token-shift states and one WKV state:

* ``conv_states[0]``: the time-mix token shift, the previous token's LN1 output, [B, C, 1] in the model dtype;
* ``conv_states[1]``: the channel-mix token shift, the previous token's LN2 output, [B, C, 1];
* ``recurrent_states[0]``: the WKV state in fp32: [B, 3, C] (aa, bb, pp) for RWKV-4, [B, H, N, N] for
  RWKV-5.2/6 (indexed [key, value]) and RWKV-7 (indexed [value, key]) — the official package's layouts.

Because the layers are transformers' own, beam search reorders them through ``Cache.reorder_cache`` and
the tensors keep static addresses (CUDA graphs). On top of that this class adds what a recurrent model needs
and ``Cache`` does not give: a token counter for ``get_seq_length`` (generate needs it to continue from a
cache), cloning, batch expansion, and copy-on-write freezing so a saved state is never changed by a later
forward.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import List, Optional

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer

TIME_SHIFT, CHANNEL_SHIFT = 0, 1
_LOCK_CREATION = threading.Lock()  # so that two threads starting on one new cache get the same lock
WKV = 0


class RwkvCache(Cache):
    """RWKV recurrent state. Build it with ``RwkvCache(config)``; the model fills it on the first forward."""

    def __init__(self, config, **kwargs):
        super().__init__(layers=[LinearAttentionLayer(number_of_states=2) for _ in range(config.num_hidden_layers)])
        self.rwkv_version = config.rwkv_version
        self.seen_tokens = 0
        self.frozen = False
        self._busy = None  # made on first use: a lock made here would break a torch.compile graph (see exclusive)

    # --- one forward at a time ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self):
        """Held by a forward while it advances this cache. Two threads advancing one cache would leave a state
        that matches neither order, so the second is refused; to share a state between threads, ``freeze()`` it
        (each forward then advances a private copy) or give each thread a ``clone()``."""
        with _LOCK_CREATION:
            if self._busy is None:
                self._busy = threading.Lock()
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "This RwkvCache is being advanced by another forward (another thread?). Give each thread its own "
                "cache.clone(), or freeze() a shared one so that every forward works on a private copy."
            )
        try:
            yield self
        finally:
            self._busy.release()

    def __getstate__(self):  # copy and pickle without the lock: a copy is a new, idle cache
        state = self.__dict__.copy()
        state.pop("_busy", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._busy = None

    # --- what generate needs ------------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (a recurrent state has no length; generate uses this to skip the cached prefix)."""
        return self.seen_tokens

    @property
    def is_compileable(self) -> bool:
        # generate auto-compiles compileable non-DynamicCache caches on CUDA; the model's own decode path
        # (kernel + optional CUDA graph) is what should run instead.
        return False

    def crop(self, max_length: int):
        raise NotImplementedError(
            "An RWKV state cannot be cropped: the recurrence folds every token into it. Keep a clone of the "
            "state at the point you want to return to (RwkvCache.clone())."
        )

    # --- state access ---------------------------------------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers) and self.layers[0].has_previous_state[TIME_SHIFT]

    @property
    def batch_size(self) -> Optional[int]:
        return self.layers[0].conv_states[TIME_SHIFT].shape[0] if self.is_initialized else None

    def shift_state(self, layer_idx: int, which: int) -> Optional[torch.Tensor]:
        """The previous token's normalised input [B, C] of the time mix (which=0) or channel mix (which=1)."""
        layer = self.layers[layer_idx]
        if not layer.has_previous_state[which]:
            return None
        return layer.conv_states[which][..., -1]

    def wkv_state(self, layer_idx: int) -> Optional[torch.Tensor]:
        layer = self.layers[layer_idx]
        return layer.recurrent_states[WKV] if layer.is_recurrent_states_initialized[WKV] else None

    def update(self, layer_idx: int, time_shift: torch.Tensor, wkv_state: torch.Tensor, channel_shift: torch.Tensor):
        """Store one layer's new state: shift states [B, C] and the fp32 WKV state."""
        layer = self.layers[layer_idx]
        if layer.has_previous_state[TIME_SHIFT] and not layer.record_past:
            # The steady state of decoding: plain in-place copies (static addresses kept for CUDA graphs).
            layer.conv_states[TIME_SHIFT].copy_(time_shift.unsqueeze(-1))
            layer.conv_states[CHANNEL_SHIFT].copy_(channel_shift.unsqueeze(-1))
            if wkv_state.device.type == "cpu" and wkv_state.dtype == torch.float32 and not wkv_state.requires_grad:
                # No graphs on CPU: take the new fp32 state as is rather than copying 4*H*N*N bytes per layer.
                layer.recurrent_states[WKV] = wkv_state
            else:
                layer.recurrent_states[WKV].copy_(wkv_state)
            return
        # update_conv_state flips has_previous_state, which is read before the recurrent state (see wkv_state).
        layer.update_conv_state(time_shift.unsqueeze(-1), TIME_SHIFT, conv_kernel_size=1)
        layer.update_conv_state(channel_shift.unsqueeze(-1), CHANNEL_SHIFT, conv_kernel_size=1)
        layer.update_recurrent_state(wkv_state.float(), WKV)

    def ensure_writable(self) -> "RwkvCache":
        """The cache a forward may write into: itself, or a private copy when this one is frozen."""
        return self.clone() if self.frozen else self

    # --- copying, forking, batching -------------------------------------------------------------------------

    def clone(self) -> "RwkvCache":
        """An independent copy (unfrozen) that can be advanced without touching this one."""
        # Tensors are cloned rather than deep-copied: deepcopy refuses non-leaf tensors (a state from a forward
        # run with autograd on); clone keeps them differentiable.
        memo = {}
        for layer in self.layers:
            for states in (layer.conv_states, layer.recurrent_states):
                for tensor in states.values():
                    if isinstance(tensor, torch.Tensor):
                        memo[id(tensor)] = tensor.clone()
        other = copy.deepcopy(self, memo)
        other.frozen = False
        return other

    def freeze(self) -> "RwkvCache":
        """Mark this state as a snapshot: forwards given it work on a copy and never change it."""
        self.frozen = True
        return self

    def _map_tensors(self, fn):
        for layer in self.layers:
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = fn(layer.conv_states[i])
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = fn(layer.recurrent_states[i])

    def batch_repeat_interleave(self, repeats: int):
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map_tensors(lambda t: t[indices])

    def to(self, device=None, dtype=None) -> "RwkvCache":
        """Move the state; ``dtype`` applies to the token-shift states only (the WKV state stays fp32)."""
        for layer in self.layers:
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = layer.conv_states[i].to(device=device, dtype=dtype)
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = layer.recurrent_states[i].to(device=device)
            if device is not None:
                layer.device = torch.device(device)
        return self

    @classmethod
    def stack(cls, caches: List["RwkvCache"]) -> "RwkvCache":
        """Concatenate states along the batch: row i of the result continues ``caches[i]`` (one state per row)."""
        if not caches or not all(c.is_initialized for c in caches):
            raise ValueError("RwkvCache.stack needs a non-empty list of initialised caches")
        out = caches[0].clone()
        for layer_idx, layer in enumerate(out.layers):
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = torch.cat([c.layers[layer_idx].conv_states[i] for c in caches])
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = torch.cat([c.layers[layer_idx].recurrent_states[i] for c in caches])
        out.seen_tokens = max(c.seen_tokens for c in caches)
        return out

    # --- the official package's state list ----------------------------------------------------------------

    @classmethod
    def from_official_state(cls, config, state: List[torch.Tensor]) -> "RwkvCache":
        """Build a batch-1 cache from the official ``rwkv`` package's state list.

        RWKV-4 uses 5 tensors per layer (att shift, aa, bb, pp, ffn shift); later versions 3 (att shift, WKV
        matrix, ffn shift), with the matrix in the same orientation as this cache.
        """
        per_layer = 5 if config.rwkv_version == "4" else 3
        if len(state) != per_layer * config.num_hidden_layers:
            raise ValueError(
                f"An official RWKV-{config.rwkv_version} state for {config.num_hidden_layers} layers has "
                f"{per_layer * config.num_hidden_layers} tensors, got {len(state)}"
            )
        cache = cls(config)
        for i in range(config.num_hidden_layers):
            s = state[i * per_layer : (i + 1) * per_layer]
            wkv = torch.stack(s[1:4]) if per_layer == 5 else s[1]
            cache.update(i, s[0].reshape(1, -1), wkv.unsqueeze(0).float(), s[-1].reshape(1, -1))
        return cache

    def to_official_state(self, row: int = 0) -> List[torch.Tensor]:
        """Row ``row`` of this cache as the official package's state list (see ``from_official_state``)."""
        if not self.is_initialized:
            raise ValueError("The cache is empty: run the model on some tokens first")
        out = []
        for i in range(len(self.layers)):
            wkv = self.wkv_state(i)[row]
            middle = list(wkv.unbind(0)) if self.rwkv_version == "4" else [wkv]
            out += [self.shift_state(i, TIME_SHIFT)[row], *middle, self.shift_state(i, CHANNEL_SHIFT)[row]]
        return [t.clone() for t in out]

    def __repr__(self):
        return (
            f"RwkvCache(version={self.rwkv_version}, layers={len(self.layers)}, batch={self.batch_size}, "
            f"seen_tokens={self.seen_tokens}, frozen={self.frozen})"
        )
