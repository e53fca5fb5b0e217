"""An SSD-SGD optimizer's checkpoint: the wrapped optimizer's state plus SSD-SGD's own under
``"ssd_sgd"`` (the step, the settings, the tensor names, the counters and the delay stage's state),
refused where it was written for another model or other settings."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .settings import SSDSettings

if TYPE_CHECKING:
    from .delay import DelayStage
    from .stats import SSDStats
    from .warmup_end import WarmupEnd

logger = logging.getLogger(__name__)

STATE_KEY = "ssd_sgd"
STATE_VERSION = 4
READABLE_VERSIONS = (3, 4)   # 3: no drift correction (it loads as off)


class SavedState:
    """Methods of the optimizer made by ``DistributedOptimizer`` (see ``optimizer``)."""

    _ssd_base: type
    _ssd_engine: "DelayStage"
    _ssd_settings: SSDSettings
    _ssd_warmup: "WarmupEnd"
    _ssd_param_names: list[str]
    _ssd_buffer_names: list[str]
    _ssd_step: int
    _ssd_checked: bool
    _ssd_windows: bool
    _synchronized: bool
    _ssd_backward_passes: dict
    ssd_stats: "SSDStats"

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus all SSD-SGD state under ``"ssd_sgd"``. A window in
        flight is waited for (not landed), so a resumed run lands it at the same step."""
        state = self._ssd_base.state_dict(self)
        state[STATE_KEY] = {
            "version": STATE_VERSION,
            "step": self._ssd_step,
            "settings": self._ssd_settings.as_dict(),
            "names": self._ssd_param_names + self._ssd_buffer_names,
            "stats": self.ssd_stats.as_dict(),
            "warmup": self._ssd_warmup.state_dict(),
            **self._ssd_engine.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` saved; a plain optimizer state starts SSD-SGD at step 0."""
        state_dict = dict(state_dict)
        ssd = state_dict.pop(STATE_KEY, None)
        if ssd is not None:
            self._ssd_check_compatible(ssd)
            if not self._ssd_windows and ssd.get("global_weights") is not None:
                raise ValueError("the checkpoint's windows ran between nodes, and this job has one node, where "
                                 "hierarchical SSD-SGD is synchronous SGD and runs none: resume on as many nodes, "
                                 "or with local_sync=False")
        self.ssd_stats.load_state_dict(ssd["stats"] if ssd else {})   # the engine then shows its window
        self._ssd_engine.load_state_dict(ssd or {})
        self._ssd_warmup.load_state_dict((ssd or {}).get("warmup"))
        self._ssd_base.load_state_dict(self, state_dict)
        self._synchronized = False
        self._ssd_backward_passes.clear()
        self._ssd_checked = False   # the next step compares positions across ranks
        if ssd is None:
            logger.warning("optimizer state has no SSD-SGD part: starting at step 0 (warm-up)")
            self._ssd_step = 0
            return
        self._ssd_step = int(ssd["step"])

    def _ssd_check_compatible(self, ssd: dict[str, Any]) -> None:
        if ssd.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"SSD-SGD state version {ssd.get('version')!r} is not {STATE_VERSION}: it was "
                             "written by another ssd_allreduce release; resume with that release or start anew")
        names = self._ssd_param_names + self._ssd_buffer_names
        if ssd["names"] != names:
            first = next(i for i in range(max(len(names), len(ssd["names"])))
                         if i >= len(names) or i >= len(ssd["names"]) or names[i] != ssd["names"][i])
            raise ValueError(f"the checkpoint's model differs from this one at tensor #{first} "
                             f"({ssd['names'][first] if first < len(ssd['names']) else None!r} vs "
                             f"{names[first] if first < len(names) else None!r}): load it into the same model")
        saved = SSDSettings.from_dict(ssd["settings"])
        diff = saved.differences(self._ssd_settings)
        if diff:
            older = (" (the delay defaulted to k in earlier releases: pass delay=k, --delay K)"
                     if saved.delay == saved.sync_every and self._ssd_settings.delay == "auto" else "")
            raise ValueError(f"the checkpoint was written with other SSD-SGD settings (checkpoint vs this "
                             f"optimizer: {'; '.join(diff)}): build the optimizer with the checkpoint's "
                             f"settings to resume{older}")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("an SSD-SGD optimizer is saved with optimizer.state_dict(), which carries "
                        "the global weights and the window in flight; pickling the optimizer "
                        "object itself is not supported")
