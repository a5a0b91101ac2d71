"""Resumable training checkpoints: written and read by Hugging Face Accelerate, made
atomic and hash-verified here, and never unpickling anything but tensors and plain data.

A checkpoint directory holds one complete state and a manifest (cofi.manifest)::

    manifest.json            # every file below with its SHA-256; the step, the process count
    step-00000012/
        model.safetensors    # Accelerate: the modules' weights, in TrainingState.modules order
        model_1.safetensors  #   (model_<i>: the i-th module)
        optimizer.bin, optimizer_1.bin, ...   # Accelerate: the optimizers' state dicts
        scheduler.bin                         # Accelerate: the schedulers' state dicts
        random_states_<rank>.pkl              # Accelerate: each process's Python, NumPy, torch and CUDA RNG
        generators_<rank>.pt                  # each process's own torch.Generators (TrainingState.generators)
        progress.pt                           # the caller's record: step, evaluations, history, best

Accelerate's ``save_accelerator_state`` / ``load_accelerator_state`` (what
``Accelerator.save_state`` / ``load_state`` run for a model that is neither FSDP nor
DeepSpeed) write and read the files it names. What it does not do is done here:

- Atomicity. Accelerate writes into the directory it is given, in place. Each save
  goes to a new ``step-<n>/`` folder; once every process has written its files, the
  main process syncs them to disk and atomically replaces the manifest, then deletes
  the previous folder. A crash at any moment leaves a manifest naming a complete state.
- Integrity. Accelerate records no hashes; the manifest names a damaged file.
- A checked restore of the random states. ``load_accelerator_state`` catches any error
  while restoring them (a missing, damaged or refused file) and only logs "Could not
  load random states" at INFO level: the run would go on with other random numbers.
  After it returns, the restored states are compared with the file; any difference raises.
- No pickled code. Every file is read with ``torch.load(weights_only=True)``
  (Accelerate's loader; it allows NumPy arrays, for NumPy's RNG state) or from
  safetensors; a file holding anything else (a class instance, a function) is refused,
  naming the file. Accelerate's ``register_for_checkpointing`` objects are read with
  ``weights_only=False``, so the caller's record (``progress.pt``) and its generators
  are written and read here instead.

``Accelerator.save_state`` itself is not used: it saves only what ``Accelerator.prepare``
registered, and ``prepare`` would wrap the model in DistributedDataParallel (whose
all-reduce the trainer does itself, cofi.distributed) and make the learning-rate
scheduler step once per process per step.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cofi.distributed import Processes
from cofi.manifest import MANIFEST, ManifestError, fsync_path, hash_files, list_files, read_manifest, verify_files, write_manifest

FORMAT = "accelerate-1"  # the manifest's "format": the layout above
PROGRESS = "progress.pt"


@dataclass
class TrainingState:
    """The live objects a checkpoint saves and restores in place."""

    modules: Sequence[nn.Module]  # their weights (state_dict), in this order
    optimizers: Sequence[torch.optim.Optimizer]
    schedulers: Sequence[Any]  # torch.optim.lr_scheduler.LRScheduler
    # torch.Generators of this process, besides the global RNGs Accelerate keeps (by name)
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)


def _state_folder(step: int) -> str:
    return f"step-{step:08d}"


def _accelerate(processes: Processes) -> None:
    """Accelerate's checkpoint functions need its process state (a multi-process run made it)."""
    from accelerate import PartialState

    PartialState(cpu=processes.device.type == "cpu")


def save_checkpoint(directory: str | os.PathLike, step: int, state: TrainingState, progress: Mapping[str, Any],
                    processes: Processes) -> Path:
    """Save ``state`` and ``progress`` (tensors and plain data) as the checkpoint of ``step``.
    Every process calls it: each saves its random states, the main process the rest."""
    from accelerate.checkpointing import save_accelerator_state

    _accelerate(processes)
    directory = Path(directory)
    folder = directory / _state_folder(step)
    if processes.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # what a crash in an earlier save of this step left
        folder.mkdir(parents=True)
    processes.barrier()
    save_accelerator_state(str(folder), [_stored(m) for m in state.modules], list(state.optimizers),
                           list(state.schedulers), [], processes.rank, step, safe_serialization=True)
    torch.save({name: g.get_state() for name, g in state.generators.items()},
               folder / f"generators_{processes.rank}.pt")
    if processes.is_main:
        torch.save(dict(progress), folder / PROGRESS)
    processes.barrier()  # every process's files are complete
    if processes.is_main:
        names = [f"{folder.name}/{name}" for name in list_files(folder)]
        for name in names:  # on disk before the manifest names them
            fsync_path(directory / name)
        write_manifest(directory, hash_files(directory, names), step=step, processes=processes.world_size,
                       format=FORMAT)
        for previous in directory.glob("step-*"):
            if previous != folder:
                shutil.rmtree(previous, ignore_errors=True)
    processes.barrier()
    return folder


def load_checkpoint(directory: str | os.PathLike, state: TrainingState, processes: Processes) -> dict[str, Any] | None:
    """Restore ``state`` (and this process's random states) from the checkpoint in ``directory``
    and return its ``progress``; None if there is none. A damaged checkpoint, one written
    by another number of processes or another layout, or a file holding more than tensors
    and plain data raises ManifestError naming the file."""
    from accelerate.checkpointing import load_accelerator_state

    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        return None
    start_over = "; delete the checkpoint directory to start over"
    try:
        manifest = read_manifest(directory)
        verify_files(directory, manifest, complete=False)  # a crash may leave a partial or a previous folder
    except ManifestError as e:
        raise ManifestError(f"{e}{start_over}", e.path, e.expected, e.actual) from e
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{directory}: a checkpoint of another layout (format {manifest.get('format')!r}, "
                            f"this version reads {FORMAT!r}){start_over}", path=directory / MANIFEST)
    if manifest["processes"] != processes.world_size:
        raise ManifestError(f"{directory}: a checkpoint of {manifest['processes']} processes; this run has "
                            f"{processes.world_size}: resume with {manifest['processes']}{start_over}",
                            path=directory / MANIFEST)
    folder = directory / _state_folder(manifest["step"])
    _accelerate(processes)
    _check_weight_names(folder, state.modules, start_over)
    try:  # not strict: the empty tensors _stored left out keep their (empty) values
        load_accelerator_state(str(folder), list(state.modules), list(state.optimizers), list(state.schedulers),
                               [], processes.rank, map_location="cpu", strict=False)
    except pickle.UnpicklingError as e:
        raise _refused(folder, manifest, start_over) from e
    _check_random_states(folder / f"random_states_{processes.rank}.pkl", start_over)
    generators = _load_tensors(folder / f"generators_{processes.rank}.pt", start_over)
    if set(generators) != set(state.generators):
        raise ManifestError(f"{folder}: generators {sorted(generators)} saved, {sorted(state.generators)} to "
                            f"restore{start_over}", path=folder / f"generators_{processes.rank}.pt")
    for name, generator in state.generators.items():
        generator.set_state(generators[name])
    return _load_tensors(folder / PROGRESS, start_over)


def _stored(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: all but empty tensors (a compacted model's pruned-away
    sublayers), which hold nothing and which safetensors would take for one shared tensor,
    and leave out all but one of, with a warning."""
    return {name: t for name, t in module.state_dict().items() if t.numel()}


def _check_weight_names(folder: Path, modules: Sequence[nn.Module], start_over: str) -> None:
    """Each module's stored weights are the ones it has (so the non-strict load misses nothing)."""
    from accelerate.utils import SAFE_MODEL_NAME
    from safetensors import safe_open

    for i, module in enumerate(modules):
        path = folder / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors"  # save_accelerator_state's names
        with safe_open(path, "pt") as f:
            stored = set(f.keys())
        expected = set(_stored(module))
        if stored != expected:
            raise ManifestError(f"{path}: weights of another model (missing {sorted(expected - stored)[:3]}, "
                                f"unexpected {sorted(stored - expected)[:3]}){start_over}", path=path)


def _load_tensors(path: Path, start_over: str) -> Any:
    from accelerate.utils import load

    try:
        return load(path, map_location="cpu")  # weights_only=True
    except pickle.UnpicklingError as e:
        raise ManifestError(f"{path}: holds {_unsupported(e)}, not only tensors and plain data: refused to "
                            f"unpickle it{start_over}", path=path) from e


def _unsupported(error: Exception) -> str:
    """What weights_only refused, from torch's message (which runs over many lines)."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return found.group(1) if found else f"what torch refuses ({str(error).strip().splitlines()[0]})"


def _refused(folder: Path, manifest: Mapping[str, Any], start_over: str) -> ManifestError:
    """The error for a checkpoint file weights_only refused, naming the file (Accelerate's
    error does not): every listed file of the folder is tried."""
    for name in sorted(manifest["files"]):
        path = folder.parent / name
        if path.suffix in (".bin", ".pkl", ".pt"):
            try:
                _load_tensors(path, start_over)
            except ManifestError as e:
                return e
    return ManifestError(f"{folder}: a file holds more than tensors and plain data: refused to unpickle it"
                         f"{start_over}", path=folder)


def _check_random_states(path: Path, start_over: str) -> None:
    """The random states Accelerate restored are this process's saved ones: Accelerate
    swallows any error while restoring them."""
    saved = _load_tensors(path, start_over) if path.is_file() else None
    if saved is None:
        raise ManifestError(f"{path}: missing: this process's random states{start_over}", path=path)
    restored = {
        "random_state": random.getstate() == saved["random_state"],
        "numpy_random_seed": all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved["numpy_random_seed"])),
        "torch_manual_seed": torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]),
    }
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in saved:
        restored["torch_cuda_manual_seed"] = all(
            torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), saved["torch_cuda_manual_seed"]))
    wrong = [name for name, ok in restored.items() if not ok]
    if wrong:
        raise ManifestError(f"{path}: Accelerate did not restore the random states {', '.join(wrong)}{start_over}",
                            path=path)
