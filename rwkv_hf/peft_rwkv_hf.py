"""State tuning as a PEFT method: ``get_peft_model(model, StateTuningConfig())``.

State tuning trains only the initial WKV state of every layer (``blocks.{i}.att.time_state`` in RWKV-LM /
RWKV-PEFT); every weight stays frozen. Here the state lives in the model's initial-state slot
(``rwkv.init_state``, see ``state_rwkv_hf``), and the PEFT layer wraps that slot the way a LoRA layer wraps a
``Linear``: one fp32 parameter per adapter (``state_tuning_wkv[adapter]``: [layers, heads, N, N], cache layout),
optionally the token-shift states too (``state_tuning_shift[adapter]``: [2, layers, width]).

What follows from being a real PEFT method: ``save_pretrained`` / ``PeftModel.from_pretrained`` /
``model.load_adapter``, several adapters with ``set_adapter`` (several active at once = their mean),
``disable_adapter()``, ``merge_and_unload()`` (the state becomes the model's default initial state), Trainer
and accelerate support. ``save_init_state(peft_model, "x.state")`` exports the active adapter for Ai00 /
RWKV-Runner.

PEFT only registers methods whose name is a member of its closed ``PeftType`` enum, so ``register_state_tuning``
adds ``STATE_TUNING`` to it at runtime (falling back to plain-string keys in PEFT's mappings if the enum
internals ever change). ``import rwkv_hf`` calls it; it must run before ``PeftModel.from_pretrained``.

LoRA and state tuning in one model: PEFT refuses adapters of two types on one model, so use one LoRA adapter
that also saves the state slot: ``make_init_state_trainable(model)`` then
``get_peft_model(model, LoraConfig(target_modules=[...], modules_to_save=["init_state"]))``.

An adapter records the model it is tuned on (``StateTuningConfig.model_identity``: version, shapes and
``model_weights_hash``, filled in when the adapter is created and saved in ``adapter_config.json``). Loading it
into a model of another version or shape is refused; into other weights of the same shape too, unless
``PeftModel.from_pretrained(model, path, allow_other_model=True)``. Adapter weights with NaN/Inf are refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType

from .state_rwkv_hf import (
    InitState,
    StateFileError,
    _check_same_weights,
    _describe_config,
    _describe_fingerprint,
    _ensure_slot,
    _fingerprint_config,
    _model_device,
    _model_identity,
    _require_finite,
    _require_finite_triple,
    _rwkv_model,
    layer_states_from,
    model_weights_hash,
)

PEFT_METHOD = "state_tuning"
PREFIX = "state_tuning_"


def _state_tuning_peft_type():
    """``PeftType.STATE_TUNING``, added to PEFT's closed enum on first use (plain string if that fails)."""
    name = PEFT_METHOD.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    try:
        member = str.__new__(PeftType, name)
        member._name_, member._value_ = name, name
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        type.__setattr__(PeftType, name, member)  # attribute access first: EnumType refuses reassigning members
        PeftType._member_names_.append(name)
        PeftType._member_map_[name] = member
        PeftType._value2member_map_[name] = member
        return member
    except Exception:  # noqa: BLE001 - private enum internals: a str key works in PEFT's dict lookups too
        return name


STATE_TUNING = _state_tuning_peft_type()


@dataclass
class StateTuningConfig(PeftConfig):
    """Configuration of state tuning.

    Args:
        init: "base" starts from the model's current default initial state (zeros if it has none; load a
            ``.pth``/``.state`` with ``load_init_state`` first to continue tuning it), "zeros" from zeros.
        tune_shift_states: also train the token-shift states (RWKV-LM and RWKV-PEFT do not: they are small and
            matter little; ``.pth`` / ``.state`` files cannot hold them).
        target_modules: the initial-state slot, ``["init_state"]`` (there is nothing else to target).
        modules_to_save: other modules to train fully and save with the adapter (e.g. ``["head"]``).
        model_identity: the model the state is tuned on (version, shapes, ``base_model_hash``). Leave it None: it
            is filled in when the adapter is created, saved with it, and checked when it is loaded. ``{}`` marks
            an adapter saved by an older rwkv_hf, which recorded none (it loads with a logged warning).
        allow_other_model: load the adapter even though ``model_identity`` names other weights of the same
            shape (``PeftModel.from_pretrained(..., allow_other_model=True)``). Never saved; another version or
            shape is refused regardless.
    """

    task_type: Optional[str] = field(default="CAUSAL_LM", metadata={"help": "PEFT task type"})
    init: str = field(default="base", metadata={"help": "'base' (the model's default state) or 'zeros'"})
    tune_shift_states: bool = field(default=False, metadata={"help": "also train the token-shift states"})
    target_modules: Optional[Union[List[str], str]] = field(
        default_factory=lambda: ["init_state"], metadata={"help": "the initial-state slot"}
    )
    modules_to_save: Optional[List[str]] = field(default=None, metadata={"help": "modules trained fully and saved"})
    model_identity: Optional[Dict[str, str]] = field(
        default=None, metadata={"help": "the model the state is tuned on; recorded at creation, checked at loading"}
    )
    allow_other_model: bool = field(
        default=False, metadata={"help": "load into other weights of the same shape (not saved)"}
    )

    def __post_init__(self):
        # A config read from adapter_config.json comes with its peft_type; a new one gets it below. A read one
        # without model_identity was saved before identities existed: {} says so, None would be filled in with
        # this model's identity and hide that nothing was checked.
        if self.peft_type is not None and self.model_identity is None:
            self.model_identity = {}
        super().__post_init__()
        self.peft_type = STATE_TUNING
        if self.init not in ("base", "zeros"):
            raise ValueError(f"init must be 'base' or 'zeros', got {self.init!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)

    def to_dict(self) -> dict:
        # The override is for one load; saving it would switch the check off for everyone who loads the adapter.
        out = super().to_dict()
        out.pop("allow_other_model", None)
        return out


class StateTuningLayer(nn.Module, BaseTunerLayer):
    """Wraps the model's ``RwkvInitState``: the active adapter's state is the default initial state."""

    adapter_layer_names = ("state_tuning_wkv", "state_tuning_shift")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: StateTuningConfig, device=None):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.state_tuning_wkv = nn.ParameterDict()
        self.state_tuning_shift = nn.ParameterDict()  # [2, layers, width]: time-mix then channel-mix shift
        self._disable_adapters = False
        self.merged_adapters = []
        self._restore = []  # (default_name, key, previous state) per merge, for unmerge
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, device)

    @property
    def num_layers(self) -> int:
        return self.base_layer.num_layers

    def update_layer(self, adapter_name: str, config: StateTuningConfig, device=None):
        base = self.base_layer
        start = base.resolve(None) if config.init == "base" else None
        if start is not None:  # training from NaN gives NaN: refuse it now, naming the layer
            _require_finite_triple(start, f"The initial state adapter {adapter_name!r} would start from")
        L, H, N, C = base.num_layers, base.num_heads, base.head_size, base.hidden_size
        # fp32 whatever the model dtype: with lr ~1 a bf16 state would round most updates away.
        wkv = start[0].detach().float().clone() if start is not None else torch.zeros(L, H, N, N)
        self.state_tuning_wkv[adapter_name] = nn.Parameter(wkv.to(device) if device is not None else wkv)
        if config.tune_shift_states:
            shifts = [start[j] if start is not None and start[j] is not None else None for j in (1, 2)]
            shift = torch.stack(
                [s.detach().float() if s is not None else torch.zeros(L, C, device=wkv.device) for s in shifts]
            )
            self.state_tuning_shift[adapter_name] = nn.Parameter(shift.to(device) if device is not None else shift)
        self.set_adapter(self.active_adapters)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Adapter weights arrive here (PeftModel.from_pretrained, load_adapter, Trainer resuming): check them
        # before they replace the parameters, so a NaN state never becomes the model's initial state. This
        # module's hook runs before its ParameterDicts load theirs.
        for key, value in state_dict.items():
            if not key.startswith(prefix) or not isinstance(value, torch.Tensor) or value.device.type == "meta":
                continue
            local = key[len(prefix) :]
            if local.startswith("state_tuning_wkv."):
                _require_finite(value.detach(), "the WKV state", f"The state-tuning adapter weight {local!r}")
            elif local.startswith("state_tuning_shift.") and value.dim() == 3:  # [time/channel, layers, width]
                for part, what in zip(value.detach(), ("the time-mix shift state", "the channel-mix shift state")):
                    _require_finite(part, what, f"The state-tuning adapter weight {local!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapter_state(self, adapter_names: List[str]):
        """(wkv, time_shift, channel_shift) of one adapter, or the mean of several (mixing states)."""
        wkvs = [self.state_tuning_wkv[a] for a in adapter_names]
        shifts = [self.state_tuning_shift[a] if a in self.state_tuning_shift else None for a in adapter_names]
        if len(adapter_names) == 1:
            shift = shifts[0]
            return (wkvs[0], None if shift is None else shift[0], None if shift is None else shift[1])
        wkv = torch.stack(wkvs).mean(0)
        if all(s is None for s in shifts):
            return (wkv, None, None)
        shift = torch.stack(
            [s if s is not None else torch.zeros_like(next(x for x in shifts if x is not None)) for s in shifts]
        ).mean(0)
        return (wkv, shift[0], shift[1])

    def resolve(self, name):
        # name=None: the active adapter(s); a name: a state mounted with load_init_state (the bank lives in the base).
        if name is None and not self.disable_adapters and not self.merged:
            active = [a for a in self.active_adapters if a in self.state_tuning_wkv]
            if active:
                return self.adapter_state(active)
        return self.base_layer.resolve(name)

    def layer_states(self, batch_size, dtype, device, name=None):
        return layer_states_from(self.resolve, self.num_layers, batch_size, dtype, device, name)

    forward = layer_states

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Make the adapter(s) the base's default initial state (several: their mean)."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.state_tuning_wkv]
        if not adapter_names:
            return
        wkv, ts, cs = (None if t is None else t.detach().clone() for t in self.adapter_state(adapter_names))
        if safe_merge and not all(t is None or bool(torch.isfinite(t).all()) for t in (wkv, ts, cs)):
            raise ValueError(f"NaNs detected in the state of adapter(s) {adapter_names}; not merged")
        base = self.base_layer
        key = "+".join(adapter_names)
        self._restore.append((base.default_name, key, base.states.get(key)))
        base.states[key] = InitState(base.rwkv_version, wkv, ts, cs, source=f"peft adapter {key}")
        base.default_name = key
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.base_layer
        while self._restore:
            default_name, key, previous = self._restore.pop()
            if previous is None:
                base.states.pop(key, None)
            else:
                base.states[key] = previous
            base.default_name = default_name
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "state_tuning." + super().__repr__()


class StateTuningModel(BaseTuner):
    """The tuner: wraps ``rwkv.init_state`` (created if the model has none) in a ``StateTuningLayer``."""

    prefix: str = PREFIX
    tuner_layer_cls = StateTuningLayer
    target_module_mapping = {"rwkv_hf": ["init_state"]}

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = ["init_state"]
        return peft_config

    def _prepare_model(self, peft_config, model):
        _ensure_slot(model)  # RWKV-4 is refused here, with the reason

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        device = _model_device(parent) if hasattr(parent, "get_input_embeddings") else None
        if not isinstance(target, StateTuningLayer) and type(target).__name__ != "RwkvInitState":
            raise TypeError(
                f"state tuning targets the model's initial-state slot (rwkv.init_state); {current_key!r} is a "
                f"{type(target).__name__}"
            )
        _check_or_record_identity(peft_config, adapter_name, _rwkv_model(parent))
        if isinstance(target, StateTuningLayer):
            target.update_layer(adapter_name, peft_config, device)
        else:
            self._replace_module(
                parent, target_name, StateTuningLayer(target, adapter_name, peft_config, device), target
            )

    def _replace_module(self, parent, child_name, new_module, child):
        # BaseTuner's version copies child.weight, which a state slot does not have.
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # The states are created in fp32 and must stay so.
        return


def _check_or_record_identity(config: StateTuningConfig, adapter_name: str, base) -> None:
    """A new adapter records the model it is created on; a loaded one must come from this model.

    Runs before the adapter's layer is made, so a refusal leaves the model's states as they were."""
    recorded = config.model_identity
    what = f"The state-tuning adapter {adapter_name!r}"
    # New: it will be tuned on this model. A config object we filled in and that is used again (PEFT does not
    # copy configs: get_peft_model(other_model, same_config)) is new again, not an adapter from elsewhere.
    if recorded is None or getattr(config, "_identity_recorded_here", False):
        config.model_identity = _model_identity(base)
        config._identity_recorded_here = True  # not a dataclass field: never saved
        return
    model_desc = _describe_config(base.config)
    expected = _fingerprint_config(base.config)
    if recorded:  # version and shapes: a state is meaningless elsewhere, whatever the user says
        diffs = [k for k in expected if k in recorded and str(recorded[k]) != expected[k]]
        if diffs:
            raise StateFileError(
                f"{what} was tuned on {_describe_fingerprint(recorded)}; this model is {model_desc}. A state only "
                f"works with the model it was tuned on (differs: {', '.join(diffs)})."
            )
    _check_same_weights(
        recorded,
        lambda: model_weights_hash(base),
        what=what,
        model_desc=model_desc,
        allow_other_model=bool(config.allow_other_model),
        override="pass allow_other_model=True to PeftModel.from_pretrained (or set it on its StateTuningConfig)",
    )


_REGISTERED = False


def register_state_tuning() -> None:
    """Register ``state_tuning`` with PEFT (idempotent). Called by ``import rwkv_hf`` when peft is installed."""
    global _REGISTERED
    if _REGISTERED:
        return
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    if isinstance(STATE_TUNING, str) and not isinstance(STATE_TUNING, PeftType):
        # The enum could not be extended: string keys work for every lookup PEFT does by value.
        PEFT_TYPE_TO_CONFIG_MAPPING[STATE_TUNING] = StateTuningConfig
        PEFT_TYPE_TO_TUNER_MAPPING[STATE_TUNING] = StateTuningModel
        PEFT_TYPE_TO_PREFIX_MAPPING[STATE_TUNING] = PREFIX
    elif STATE_TUNING in PEFT_TYPE_TO_TUNER_MAPPING:
        # Registered by an earlier copy of this module (importlib.reload): point PEFT at the current classes.
        PEFT_TYPE_TO_CONFIG_MAPPING[STATE_TUNING] = StateTuningConfig
        PEFT_TYPE_TO_TUNER_MAPPING[STATE_TUNING] = StateTuningModel
    else:
        from peft.utils import register_peft_method

        register_peft_method(name=PEFT_METHOD, config_cls=StateTuningConfig, model_cls=StateTuningModel, prefix=PREFIX)
    _REGISTERED = True


__all__ = ["StateTuningConfig", "StateTuningLayer", "StateTuningModel", "register_state_tuning", "STATE_TUNING"]
