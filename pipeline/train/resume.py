"""What a training checks before it continues a run's saved state.

The resume state (``last_state.pt``, or one per fold of an ensemble) holds weights, optimizer and
schedule, not the config; the run's ``config.yaml`` says what they were trained with. Resuming under
a config that trains something else would load mismatched weights (a traceback) or, worse, mix two
settings into one model, so every training key must match, and so must what the training reads
(the classifier's cache: re-preprocessed under another window, it would train one model on two).
The epoch count is a training key: the cosine schedule is laid out for it. The keys below only
steer evaluation, inference or the machine, and may change.

``train --resume`` asks ``check_resume``, which refuses a changed config. ``medpipe run`` asks
``interrupted``, which continues a training that stopped before its end under the same config and
otherwise lets it start afresh, so rerunning the command after Ctrl-C resumes it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.checkpoint import load_state, sidecar_path
from pipeline.config import Config
from pipeline.train.loop import CHECKPOINT, LAST_STATE

__all__ = ["check_resume", "interrupted", "resume_states"]

FREE_KEYS = {
    "classify": {"workers", "fold_workers", "device", "threshold", "threshold_on", "n_boot"},
    "segment": {"infer_batch", "flip_tta", "keep_components", "max_hole_mm2", "min_aerated", "label_sides"},
}


def resume_states(out: Path) -> list[Path]:
    """The resume states in a task folder: its own, and those of an ensemble's fold members."""
    return sorted(p for p in (out / LAST_STATE, *out.glob(f"fold*/{LAST_STATE}")) if p.is_file())


def _changes(out: Path, config: Config, sections: Sequence[str], inputs: Mapping[str, Any]) -> list[str]:
    """Each training key of ``sections`` whose value differs from the run's saved ``config.yaml``,
    and each of ``inputs`` (what the training reads, e.g. the cache's preprocessing) that differs
    from what the interrupted members' checkpoints say they were trained on."""
    changed = []
    saved_path = out / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {} if saved_path.is_file() else {}
    for section in sections if saved else ():
        old, new = saved.get(section) or {}, getattr(config, section).model_dump(mode="json")
        for key in sorted(set(old) | set(new)):
            if key not in FREE_KEYS.get(section, set()) and old.get(key) != new.get(key):
                changed.append(f"{section}.{key} {old.get(key)!r} -> {new.get(key)!r}")
    for sidecar in {sidecar_path(state.parent / CHECKPOINT) for state in resume_states(out)}:
        trained_on = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
        changed += [
            f"the {key} settings of its input, since {sidecar.parent.name} began"
            for key, value in inputs.items()
            if key in trained_on and trained_on[key] != value
        ]
    return list(dict.fromkeys(changed))


def check_resume(out: Path, config: Config, sections: Sequence[str], inputs: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds a state to resume; raise ValueError naming each training key of
    ``sections`` (or input setting) that differs from what the saved state was trained with."""
    states = resume_states(out)
    if not states:
        print(f"note: {out}: no interrupted training to resume; training from scratch", file=sys.stderr)
        return False
    if changed := _changes(out, config, sections, inputs):
        raise ValueError(
            f"{states[0]}: --resume continues the training that {out / 'config.yaml'} describes, and "
            f"these settings change it ({'; '.join(changed)}); resume with the run's own settings (no "
            "--config or --epochs), or train afresh without --resume"
        )
    return True


def interrupted(out: Path, config: Config, sections: Sequence[str], inputs: Mapping[str, Any]) -> bool:
    """Whether ``out`` holds a training that stopped before its end under this same config."""
    states = resume_states(out)
    if not states or _changes(out, config, sections, inputs):
        return False
    epochs = getattr(config, sections[0]).epochs
    for path in states:
        state = load_state(path)
        if not state["stopped"] and int(state["epoch"]) + 1 < epochs:
            return True
    return not (out / CHECKPOINT).is_file()  # an ensemble killed after its last member
