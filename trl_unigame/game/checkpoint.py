"""The game's part of a checkpoint: the perturber's optimizer, each process's hard-sample buffer, and the number of
processes that wrote them.

Files beside the host `Trainer`'s own, all written before `trainer_state.json` (the file that makes a checkpoint look
complete), each to a temporary file renamed into place:

- `perturber/`: the perturber (`save_pretrained`, safetensors), written with the model.
- `perturber_optimizer.pt`: its optimizer's `state_dict` (tensors and numbers only, read with `weights_only=True`).
- `generation_adversary_optimizer.pt`: with `generation_adversary` on, the generation-side adversary's optimizer, the
  same way.
- `unigame_buffer_rank{N}.safetensors`: the buffer of process `N`, one file: the images, tensor extras (e.g. the
  `source` thumbnail) and the random generator's state as tensors, and everything else (rows, scores, steps, settings)
  as JSON in the file's metadata. Nothing in it is executable: it is read without unpickling.
- `unigame_state.json`: the format version and the number of processes that wrote the checkpoint.

Buffers of the former pickle format (`unigame_buffer_rank{N}.pt`) are still read, with `torch.load(weights_only=True)`:
the ones UniGame wrote hold only tensors and plain Python values, so they load; a file holding anything else is
refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import uuid
import warnings
from typing import Any, Callable

import torch

from ..buffer import HardSampleBuffer


PERTURBER_DIR = "perturber"
PERTURBER_OPTIMIZER_NAME = "perturber_optimizer.pt"
GENERATION_ADVERSARY_OPTIMIZER_NAME = "generation_adversary_optimizer.pt"
BUFFER_NAME = "unigame_buffer_rank{rank}.safetensors"
LEGACY_BUFFER_NAME = "unigame_buffer_rank{rank}.pt"
GAME_STATE_NAME = "unigame_state.json"
LOG_STATE_NAME = "unigame_log_state_rank{rank}.json"
FORMAT_VERSION = 1

_BUFFER_FORMAT = "unigame_hard_sample_buffer"
_BUFFER_FILE = re.compile(r"^unigame_buffer_rank(\d+)\.(?:safetensors|pt)$")


def save_game_state(
    output_dir: str,
    *,
    perturber_optimizer: torch.optim.Optimizer,
    buffer: HardSampleBuffer,
    process_index: int,
    num_processes: int,
    should_save: bool,
    wait_for_everyone: Callable[[], None],
    generation_adversary_optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Writes the perturber's optimizer (and the generation-side adversary's, when given) and the process count
    (where `should_save`) and this process's buffer into `output_dir`, then waits for every process: the caller writes
    the trainer state only once all of it is on disk."""
    os.makedirs(output_dir, exist_ok=True)
    if should_save:
        _atomic_save(perturber_optimizer.state_dict(), os.path.join(output_dir, PERTURBER_OPTIMIZER_NAME))
        if generation_adversary_optimizer is not None:
            _atomic_save(
                generation_adversary_optimizer.state_dict(),
                os.path.join(output_dir, GENERATION_ADVERSARY_OPTIMIZER_NAME),
            )
        record = {"format_version": FORMAT_VERSION, "world_size": num_processes}
        _atomic_write_text(json.dumps(record, indent=2) + "\n", os.path.join(output_dir, GAME_STATE_NAME))
    save_buffer(buffer, os.path.join(output_dir, BUFFER_NAME.format(rank=process_index)))
    wait_for_everyone()


def load_game_state(
    checkpoint: str,
    *,
    perturber: torch.nn.Module,
    perturber_optimizer: torch.optim.Optimizer,
    buffer: HardSampleBuffer,
    process_index: int,
    num_processes: int,
    generation_adversary_optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Restores the perturber, its optimizer (and the generation-side adversary's, when given) and this process's
    buffer from `checkpoint`.

    Raises:
        `FileNotFoundError`: the checkpoint was not written by a UniGame trainer, or lacks part of the game's state.
        `ValueError`: it was written by a different number of processes, or holds a buffer that cannot be read safely.
    """
    from safetensors.torch import load_file

    weights = os.path.join(checkpoint, PERTURBER_DIR, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"{checkpoint} has no {PERTURBER_DIR}/model.safetensors: it was not written by a UniGame trainer, "
            "so the perturber cannot be resumed. Start a new run or pick a UniGame checkpoint."
        )
    written_by = checkpoint_world_size(checkpoint)
    if written_by is not None and written_by != num_processes:
        # Each process resumes its own buffer: with fewer processes some would be dropped, with more some would start
        # empty, and the run would not continue the one that was saved.
        raise ValueError(
            f"{checkpoint} was written by {written_by} processes, but this run has {num_processes}. Each process "
            f"resumes its own hard-sample buffer, so the number of processes must match: resume with {written_by} "
            f"processes (e.g. `accelerate launch --num_processes {written_by}` or `torchrun --nproc_per_node "
            f"{written_by}`), or start a new run from the checkpoint's weights."
        )
    optimizer_file = os.path.join(checkpoint, PERTURBER_OPTIMIZER_NAME)
    buffer_file = os.path.join(checkpoint, BUFFER_NAME.format(rank=process_index))
    if not os.path.isfile(buffer_file):
        legacy = os.path.join(checkpoint, LEGACY_BUFFER_NAME.format(rank=process_index))
        buffer_file = legacy if os.path.isfile(legacy) else buffer_file
    adversary_file = os.path.join(checkpoint, GENERATION_ADVERSARY_OPTIMIZER_NAME)
    if generation_adversary_optimizer is not None and not os.path.isfile(adversary_file):
        raise FileNotFoundError(
            f"{checkpoint} has no {GENERATION_ADVERSARY_OPTIMIZER_NAME}: it was written by a run without "
            "`generation_adversary` (or cut short while being written), so this run, which has it on, would not "
            "continue it. Resume with the setting that wrote the checkpoint, or start a new run from its weights."
        )
    missing = [os.path.basename(f) for f in (optimizer_file, buffer_file) if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f"{checkpoint} lacks the game's state ({', '.join(missing)}), so resuming from it would not continue "
            "the same run: the checkpoint was cut short while being written. Resume from an earlier checkpoint."
        )
    # Everything is read before anything is restored: a file that is refused leaves the trainer as it was.
    buffer_state = read_buffer_state(buffer_file)
    perturber_weights = load_file(weights)
    optimizer_state = _load_plain_pickle(optimizer_file)
    adversary_state = None if generation_adversary_optimizer is None else _load_plain_pickle(adversary_file)
    try:
        buffer.load_state_dict(buffer_state)  # checked whole first: a malformed state leaves the buffer as it was
    except ValueError as err:
        raise ValueError(f"{buffer_file} is not a valid buffer file: {err}") from None
    perturber.load_state_dict(perturber_weights)  # copied onto the perturber's device in place
    parameters = list(perturber.parameters())
    perturber_optimizer.load_state_dict(_regrouped(optimizer_state, perturber_optimizer, parameters))
    if adversary_state is not None:
        generation_adversary_optimizer.load_state_dict(
            _regrouped(adversary_state, generation_adversary_optimizer, parameters)
        )


def _regrouped(state: dict[str, Any], optimizer: torch.optim.Optimizer, parameters: list) -> dict[str, Any]:
    """An optimizer `state` saved with one parameter group over `parameters` (checkpoints of release 0.3 and earlier),
    laid out in `optimizer`'s groups (today's: the decayed matrices, then the rest), each keeping its own decay;
    any other state as it is."""
    if len(state["param_groups"]) != 1 or len(optimizer.param_groups) == 1:
        return state
    (saved,) = state["param_groups"]
    if len(saved["params"]) != len(parameters):
        return state  # not this perturber's: `load_state_dict` says what is wrong
    old_index = {id(p): saved["params"][i] for i, p in enumerate(parameters)}
    groups, moments, j = [], {}, 0
    for group in optimizer.param_groups:
        indices = []
        for p in group["params"]:
            if old_index[id(p)] in state["state"]:
                moments[j] = state["state"][old_index[id(p)]]
            indices.append(j)
            j += 1
        groups.append({**saved, "weight_decay": group["weight_decay"], "params": indices})
    return {"state": moments, "param_groups": groups}


def checkpoint_world_size(checkpoint: str) -> int | None:
    """The number of processes that wrote `checkpoint`: from its `unigame_state.json`, or, in checkpoints that predate
    that record, from the buffer files present (one per process); `None` when neither says."""
    record_file = os.path.join(checkpoint, GAME_STATE_NAME)
    if os.path.isfile(record_file):
        with open(record_file, encoding="utf-8") as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{record_file} is not valid JSON ({err}): the checkpoint is damaged.") from None
        _check_version(record, record_file)
        world_size = record.get("world_size")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(
                f"{record_file} holds no valid `world_size` (got {world_size!r}): the checkpoint is damaged."
            )
        return world_size
    ranks = [int(m.group(1)) for m in map(_BUFFER_FILE.match, os.listdir(checkpoint)) if m]
    return max(ranks) + 1 if ranks else None


# ---------------------------------------------------------------------------------------------------- the buffer
def save_buffer(buffer: HardSampleBuffer, path: str) -> None:
    """Writes `buffer` to `path` as one safetensors file (see the module's docstring), atomically.

    Rows and non-tensor extras must be JSON values (text, numbers, booleans, `None`, lists and string-keyed dicts of
    them), as the rows UniGame keeps for mining are; anything else raises a `TypeError` naming it.
    """
    from safetensors.torch import save_file

    state = buffer.state_dict()
    # Cloned: entries may be views of one batch tensor, and safetensors refuses tensors that share memory.
    tensors = {"generator": state["generator"].detach().cpu().contiguous().clone()}
    entries = []
    for i, (image, row, hardness, consistency, extra, step) in enumerate(
        zip(state["images"], state["rows"], state["hardness"], state["consistency"], state["extra"], state["steps"])
    ):
        tensors[f"entries.{i}.image"] = image.detach().cpu().contiguous().clone()
        tensor_extras = [key for key, value in extra.items() if isinstance(value, torch.Tensor)]
        for key in tensor_extras:
            tensors[f"entries.{i}.extra.{key}"] = extra[key].detach().cpu().contiguous().clone()
        plain_extras = {key: value for key, value in extra.items() if key not in tensor_extras}
        _check_json_value(row, f"the row of buffer entry {i}")
        _check_json_value(plain_extras, f"the extras of buffer entry {i}")
        entries.append(
            {
                "row": row,
                "hardness": hardness,
                "consistency": consistency,
                "step": step,
                "extra": plain_extras,
                "tensor_extras": tensor_extras,
            }
        )
    settings = {"capacity": state["capacity"], "temperature": state["temperature"], "pop": state["pop"]}
    metadata = {
        "format": _BUFFER_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps({**settings, "entries": entries}),
    }
    tmp = _temporary_path(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_buffer(buffer: HardSampleBuffer, path: str) -> None:
    """Restores `buffer` from a file written by [`save_buffer`] (or a buffer file of the former pickle format)."""
    buffer.load_state_dict(read_buffer_state(path))


def read_buffer_state(path: str) -> dict[str, Any]:
    """The `HardSampleBuffer.state_dict()` stored in `path`, read without executing anything from the file."""
    if path.endswith(".pt"):
        return _read_legacy_buffer_state(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable buffer file ({err}): the checkpoint is damaged.") from None
    if metadata.get("format") != _BUFFER_FORMAT:
        raise ValueError(f"{path} is not a UniGame buffer file (its metadata has no `format: {_BUFFER_FORMAT}`).")
    _check_version(metadata, path)
    try:
        saved = json.loads(metadata["state"])
        entries = saved["entries"]
        return {
            "capacity": saved["capacity"],
            "temperature": saved["temperature"],
            "pop": saved["pop"],
            "generator": tensors["generator"],
            "images": [tensors[f"entries.{i}.image"] for i in range(len(entries))],
            "rows": [e["row"] for e in entries],
            "hardness": [e["hardness"] for e in entries],
            "consistency": [e["consistency"] for e in entries],
            "extra": [
                {**e["extra"], **{key: tensors[f"entries.{i}.extra.{key}"] for key in e["tensor_extras"]}}
                for i, e in enumerate(entries)
            ],
            "steps": [e["step"] for e in entries],
        }
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a valid buffer file ({type(err).__name__}: {err}): it is damaged.") from None


def _read_legacy_buffer_state(path: str) -> dict[str, Any]:
    # The buffers UniGame pickled hold only tensors, numbers, text, lists and dicts, which `weights_only` reads.
    return _load_plain_pickle(path, f"a buffer in the former pickle format (now `{BUFFER_NAME.format(rank='{N}')}`)")


def _load_plain_pickle(path: str, description: str = "a pickle file") -> Any:
    """`torch.load(weights_only=True)`: tensors and plain Python values only, never code; anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is {description} that holds objects other than tensors and plain Python values. UniGame never "
            "writes such objects there, so the file was altered or comes from elsewhere, and unpickling it could run "
            "arbitrary code: it was not loaded. Resume from a checkpoint you trust."
        ) from err


def _check_version(record: dict[str, Any], path: str) -> None:
    try:
        version = int(record.get("format_version", FORMAT_VERSION))
    except (TypeError, ValueError):
        version = None
    if version is None or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {record.get('format_version')!r}, and this version of trl_unigame reads up to "
            f"{FORMAT_VERSION}: upgrade trl_unigame to resume from it."
        )


def _check_json_value(value: Any, where: str) -> None:
    """Raises a `TypeError` naming the first part of `value` that JSON cannot store and read back as it was."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}: a checkpoint stores only text keys.")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__name__}: a checkpoint stores buffer rows as JSON (text, numbers, booleans, None, "
        "lists and dicts of them). Keep only text fields in the rows described for mining."
    )


# -------------------------------------------------------------------------------------------- atomic writes
def _temporary_path(path: str) -> str:
    # A unique name beside the target: processes writing the same file (e.g. `save_on_each_node` on a shared disk)
    # never rename each other's half-written file.
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _atomic_save(obj, path: str) -> None:
    """`torch.save` to a temporary file renamed into place: a killed process never leaves a truncated file."""
    tmp = _temporary_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = _temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class GameCheckpointing:
    """The `transformers.Trainer` checkpoint hooks the game overrides, kept in this one place: the perturber saves
    beside the model (`_save`), and the game's state is written with the optimizer's and read back with it
    (`_save_optimizer_and_scheduler`, `_load_optimizer_and_scheduler`, private hooks of the Trainer). The host has
    `perturber`, `perturber_optimizer`, `generation_adversary_optimizer` (`None` when off) and `buffer`.
    """

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:  # under FSDP every process calls `_save`; one writes
            self.perturber.save_pretrained(os.path.join(output_dir, PERTURBER_DIR))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and _sharded_state_dict(self):
            # With FSDP's sharded state dict the host saves no weights (its checkpoints hold the shards): the model the
            # run hands over (the LoRA adapter or the full model) is gathered whole, on every process, and saved by one.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Runs inside `_save_checkpoint` before `trainer_state.json` is written: a checkpoint that has its trainer
        # state has the game's state too, whenever the process is killed.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and not os.path.isfile(os.path.join(output_dir, PERTURBER_DIR, "model.safetensors")):
            # FSDP's sharded checkpoints skip `_save`: the perturber (replicated, small) is saved whole all the same.
            self.perturber.save_pretrained(os.path.join(output_dir, PERTURBER_DIR))
        self._save_log_state(output_dir)  # before the buffer: `save_game_state` ends by waiting for every process
        save_game_state(
            output_dir,
            perturber_optimizer=self.perturber_optimizer,
            buffer=self.buffer,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
            should_save=self.args.should_save,
            wait_for_everyone=self.accelerator.wait_for_everyone,
            generation_adversary_optimizer=self.generation_adversary_optimizer,
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        log_state = read_log_state(checkpoint, self.args.process_index)
        load_game_state(
            checkpoint,
            perturber=self.perturber,
            perturber_optimizer=self.perturber_optimizer,
            buffer=self.buffer,
            process_index=self.args.process_index,
            num_processes=self.args.world_size,
            generation_adversary_optimizer=self.generation_adversary_optimizer,
        )
        if log_state is not None:
            self.game_metrics.load_state_dict(log_state["metrics"])
            self.miner.load_state_dict(log_state["miner"])

    def _save_log_state(self, output_dir: str) -> None:
        """This process's metrics recorded since the last log and its mining counters, beside its buffer."""
        state = {"metrics": self.game_metrics.state_dict(), "miner": self.miner.state_dict()}
        os.makedirs(output_dir, exist_ok=True)  # another process may not have made the checkpoint's folder yet
        path = os.path.join(output_dir, LOG_STATE_NAME.format(rank=self.args.process_index))
        _atomic_write_text(json.dumps(state) + "\n", path)

    def _load_best_model(self) -> None:
        # The host loads the best checkpoint's weights (or adapter): the perturber that played against them comes too.
        super()._load_best_model()
        weights = os.path.join(self.state.best_model_checkpoint, PERTURBER_DIR, "model.safetensors")
        if not os.path.isfile(weights):
            warnings.warn(
                f"`load_best_model_at_end`: {self.state.best_model_checkpoint} has no {PERTURBER_DIR}/, so the perturber "
                "stays the last one and is not paired with the best model's weights.",
                stacklevel=2,
            )
            return
        from safetensors.torch import load_file

        self.perturber.load_state_dict(load_file(weights))


def read_log_state(checkpoint: str, process_index: int) -> dict[str, Any] | None:
    """The log state a process saved in `checkpoint` (see `GameCheckpointing._save_log_state`); `None` in checkpoints
    that predate it, whose resumed runs log from the resumed step on."""
    path = os.path.join(checkpoint, LOG_STATE_NAME.format(rank=process_index))
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if not (
        isinstance(state, dict) and isinstance(state.get("metrics"), dict) and isinstance(state.get("miner"), dict)
    ):
        raise ValueError(f"{path} is not a valid UniGame log state: resume from another checkpoint.")
    return state


def _sharded_state_dict(trainer) -> bool:
    """Whether the host runs FSDP with a state dict type other than the full one (so it saves no weights itself)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    return "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
