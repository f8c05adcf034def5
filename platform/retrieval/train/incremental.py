"""The incremental task runner: trains a sequence of tasks, one Ray Train run per task.

For each task k of `spec.incremental.tasks`:

1. train: one Ray Train run per phase of the method (ch. 7 trains a specialist first), named
   `<job>-task<k>-<phase>` so a restarted runner resumes it from its last checkpoint. The
   workers get a `TaskCarry` (weights and statistics of earlier tasks, never their images).
2. evaluate the trained model on the test split of every task so far: a row of the task x task
   matrix (Recall@K, mAP@R), the forgetting of each old task; logged to MLflow with a heatmap,
   a line plot per task and a markdown table. Ch. 7's specialist (the new teacher, trained on the
   new task alone) is scored on the new task's test split too, logged beside the student as
   `task<k>/specialist/<metric>` and `task<k>/student_minus_specialist/<metric>`.
3. register the model version (alias `candidate`; `champion` when the job's gate holds on the
   mean over the tasks seen so far).
4. with `incremental.index`, build a new version of the gallery index (test images of every
   class seen so far) with that model; with `incremental.serve_url`, a promoted version is
   swapped into the running Serve app through its authenticated admin endpoint.
5. extend the carry for the next task (`finish_task`: the model itself; EWC's Fisher; ch. 6's
   drift statistics; ch. 7's synthesised replay images), as a Ray task on a GPU for a GPU job.

Progress is saved after every task in `<storage>/<job>/incremental/` (a JSON state and the
carry), so running the same job again continues where it stopped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.fs
import ray
import torch

from retrieval.config import INCREMENTAL_METHODS, JobSpec
from retrieval.data.tasks import TaskData, build_task_sequence
from retrieval.errors import ConfigError, IntegrityError
from retrieval.evaluation.forgetting import as_matrix, forgetting, format_matrix, mean_forgetting
from retrieval.evaluation.plots import image_grid_figure, task_lines_figure, task_matrix_figure
from retrieval.index.gallery import write_gallery_index
from retrieval.index.manifest import ModelRef, read_manifest
from retrieval.methods import build_method, save_model_package
from retrieval.methods.base import TaskAssignment
from retrieval.methods.incremental import IncrementalMethod, TaskCarry
from retrieval.serialization import from_plain, load_state, to_plain
from retrieval.tracking.runs import TrainingRun, code_version
from retrieval.train.driver import build_trainer, storage_location, storage_path
from retrieval.train.outcome import register_package
from retrieval.train.worker import CHECKPOINT_STATE

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
CARRY_FILE = "carry-after-task{task}.pt"


@dataclass
class TaskOutcome:
    """What one finished task produced."""

    task: int
    name: str
    scores: dict[int, dict[str, float]]
    model: dict[str, Any]
    promoted: bool
    index_version: str | None = None
    swap: dict[str, Any] | None = None
    #: Ch. 7: the specialist's scores on this task's test split (None for other methods and task 0).
    specialist: dict[str, float] | None = None

    def seen_means(self) -> dict[str, float]:
        """Each metric's mean over the tasks seen so far (what the gate and a sweep look at)."""
        return {key: float(np.mean([values[key] for values in self.scores.values()])) for key in self.scores[self.task]}

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "name": self.name,
            "scores": {str(task): values for task, values in self.scores.items()},
            "model": self.model,
            "promoted": self.promoted,
            "index_version": self.index_version,
            "swap": self.swap,
            "specialist": self.specialist,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskOutcome:
        return cls(
            task=int(data["task"]),
            name=str(data["name"]),
            scores={int(task): dict(values) for task, values in data["scores"].items()},
            model=dict(data["model"]),
            promoted=bool(data["promoted"]),
            index_version=data.get("index_version"),
            swap=data.get("swap"),
            specialist=None if data.get("specialist") is None else dict(data["specialist"]),
        )


@dataclass
class IncrementalOutcome:
    """The whole sequence: one outcome per task, and the task x task matrices."""

    job: str
    method: str
    task_names: list[str]
    tasks: list[TaskOutcome] = field(default_factory=list)
    run_id: str = ""

    def matrix(self, metric: str = "recall@1") -> np.ndarray:
        """`[S, T]`: `metric` on the test of task t after task s (NaN where t > s)."""
        rows = [{task: values[metric] for task, values in outcome.scores.items()} for outcome in self.tasks]
        return as_matrix(rows, num_tasks=len(self.task_names))

    def summary(self) -> dict[str, Any]:
        matrix = self.matrix()
        return {
            "job": self.job,
            "method": self.method,
            "task_names": self.task_names,
            "mlflow_run_id": self.run_id,
            "recall@1_matrix": [[None if np.isnan(value) else float(value) for value in row] for row in matrix],
            "mean_forgetting": [mean_forgetting(matrix, after=after) for after in range(matrix.shape[0])],
            "tasks": [outcome.to_json() for outcome in self.tasks],
        }


class ProgressStore:
    """The runner's saved progress, in `<storage>/<job>/incremental/` (local folder or S3)."""

    def __init__(self, spec: JobSpec) -> None:
        location, filesystem = storage_location(spec)
        if filesystem is None:
            filesystem, location = pyarrow.fs.FileSystem.from_uri(location)
        self._filesystem = filesystem
        self._folder = f"{location.rstrip('/')}/{spec.name}/incremental"
        self.location = f"{storage_path(spec).rstrip('/')}/{spec.name}/incremental"

    def _write(self, name: str, data: bytes) -> None:
        self._filesystem.create_dir(self._folder, recursive=True)
        # Written beside, then moved into place, so a crash never leaves half a file.
        temporary = f"{self._folder}/.{name}.partial"
        with self._filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        self._filesystem.move(temporary, f"{self._folder}/{name}")

    def _read(self, name: str) -> bytes | None:
        path = f"{self._folder}/{name}"
        if self._filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            return None
        with self._filesystem.open_input_stream(path) as stream:
            data: bytes = stream.read()
        return data

    def load(self) -> tuple[list[TaskOutcome], TaskCarry | None]:
        """The finished tasks and the carry after the last of them (none saved: `([], None)`)."""
        raw = self._read(STATE_FILE)
        if raw is None:
            return [], None
        finished = [TaskOutcome.from_json(item) for item in json.loads(raw)["tasks"]]
        if not finished:
            return [], None
        carry_bytes = self._read(CARRY_FILE.format(task=finished[-1].task))
        if carry_bytes is None:
            raise ConfigError(f"{self.location}: {STATE_FILE} lists finished tasks but their carry file is missing")
        name = f"{self.location}/{CARRY_FILE.format(task=finished[-1].task)}"
        carry = from_plain(load_state(carry_bytes, what=name))
        if not isinstance(carry, TaskCarry):
            raise IntegrityError(f"{name}: holds a {type(carry).__name__}, not a task carry")
        return finished, carry

    def save(self, outcome: IncrementalOutcome, carry: TaskCarry) -> None:
        buffer = io.BytesIO()
        torch.save(to_plain(carry), buffer)
        self._write(CARRY_FILE.format(task=outcome.tasks[-1].task), buffer.getvalue())
        # The state last: it names the carry file, which must exist first.
        self._write(STATE_FILE, json.dumps(outcome.summary(), indent=2).encode())

    def read_summary(self) -> dict[str, Any] | None:
        raw = self._read(STATE_FILE)
        return None if raw is None else dict(json.loads(raw))


def run_incremental(
    spec: JobSpec,
    *,
    stop_after_task: int | None = None,
    run: TrainingRun | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    promote: bool = True,
) -> IncrementalOutcome:
    """Train, evaluate, register, index and (optionally) swap every task of the sequence.

    Args:
        spec: a job with an `incremental` section and an incremental method.
        stop_after_task: stop once this task is done (the next run continues from there).
        run: log into this MLflow run (left open) instead of the job's own run.
        report: called after every task with the means over the tasks seen so far and the mean
            forgetting (e.g. `ray.tune.report` inside a sweep trial).
        promote: whether a version that passes the gate becomes `champion` (a sweep says no).

    Raises:
        ConfigError: the job has no task sequence.
        DatasetError: a task's data cannot be built.
    """
    if spec.incremental is None or spec.method.name not in INCREMENTAL_METHODS:
        raise ConfigError(f"job {spec.name!r} is not an incremental job (method {spec.method.name!r})")
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
    if not ray.is_initialized():
        ray.init()
    if run is not None:
        return _run_tasks(spec, tasks=tasks, run=run, stop_after_task=stop_after_task, report=report, promote=promote)
    run, _ = TrainingRun.start_or_resume(
        tracking_uri=spec.tracking.uri(),
        experiment=spec.tracking.experiment,
        artifact_location=spec.tracking.artifact_location,
        run_key=f"{storage_path(spec)}/{spec.name}/incremental",
        run_name=spec.name,
        params=spec.model_dump(mode="json"),
        tags={
            "retrieval.method": spec.method.name,
            "retrieval.dataset": spec.dataset.name,
            "retrieval.incremental_tasks": str(len(tasks)),
            "retrieval.code_version": code_version() or "unknown",
        },
    )
    try:
        outcome = _run_tasks(
            spec, tasks=tasks, run=run, stop_after_task=stop_after_task, report=report, promote=promote
        )
    except BaseException:
        run.finish(status="FAILED")
        raise
    run.finish()
    return outcome


def _run_tasks(
    spec: JobSpec,
    *,
    tasks: list[TaskData],
    run: TrainingRun,
    stop_after_task: int | None,
    report: Callable[[dict[str, float]], None] | None,
    promote: bool,
) -> IncrementalOutcome:
    assert spec.incremental is not None
    method = build_method(spec)
    if not isinstance(method, IncrementalMethod):
        raise ConfigError(f"method {spec.method.name!r} is not incremental")
    store = ProgressStore(spec)
    finished, carry = store.load()
    outcome = IncrementalOutcome(
        job=spec.name, method=spec.method.name, task_names=[task.name for task in tasks], run_id=run.run_id
    )
    outcome.tasks.extend(finished)
    if finished:
        logger.info("resuming %s: tasks %s are done and kept", spec.name, [item.name for item in finished])
    carry = carry or TaskCarry(task=0, classes=tasks[0].classes)
    step_offset = sum(_task_epochs(spec, position) for position in range(len(finished)))

    for task in tasks[len(finished) :]:
        carry = replace(carry, task=task.index, classes=task.classes)
        state_dict = None
        trained: torch.nn.Module | None = None
        specialist: torch.nn.Module | None = None
        for phase in method.phases(task.index):
            epochs = method.phase_epochs(phase, task_epochs=_task_epochs(spec, task.index))
            logger.info("task %d/%d (%s), phase %s: %d epochs", task.index + 1, len(tasks), task.name, phase, epochs)
            trainer = build_trainer(
                spec,
                run=run,
                name=f"{spec.name}-task{task.index}-{phase}",
                task=TaskAssignment(index=task.index, phase=phase, epochs=epochs, step_offset=step_offset),
                carry=ray.put(carry),
            )
            result = trainer.fit()
            if result.checkpoint is None:
                raise RuntimeError(f"task {task.index} ({phase}) of {spec.name!r} finished without a checkpoint")
            with result.checkpoint.as_directory() as folder:
                state_dict = load_state(Path(folder) / CHECKPOINT_STATE)["model"]
            trained = method.build_model()
            trained.load_state_dict(state_dict)
            carry = method.finish_phase(phase, model=trained, carry=carry)
            if phase == "specialist":
                specialist = trained
        step_offset += _task_epochs(spec, task.index)
        assert state_dict is not None and trained is not None
        # The last phase trains the task's model.
        model = trained.eval()

        task_outcome = _evaluate(spec, method=method, model=model, tasks=tasks, task=task, specialist=specialist)
        outcome.tasks.append(task_outcome)
        _log_matrices(spec, outcome=outcome, run=run)
        task_outcome.model, task_outcome.promoted = _register(
            spec, method=method, state_dict=state_dict, run=run, task=task_outcome, promote=promote
        )
        if spec.incremental.index:
            task_outcome.index_version = _build_index(
                spec, method=method, model=model, tasks=tasks, task=task, registered=task_outcome.model
            )
            if spec.incremental.serve_url and task_outcome.promoted:
                task_outcome.swap = _swap(spec, index_version=task_outcome.index_version)
                run.set_tag(f"retrieval.swap.task{task.index}", json.dumps(task_outcome.swap))
        if report is not None:
            report(_progress_metrics(outcome, spec))
        carry = _finish_task(spec, state_dict=state_dict, carry=carry, task=task)
        _log_replay(spec, carry=carry, task=task, run=run)
        store.save(outcome, carry)
        if stop_after_task is not None and task.index >= stop_after_task:
            logger.info("stopping after task %d as asked; run the job again to continue", task.index)
            break
    return outcome


def _progress_metrics(outcome: IncrementalOutcome, spec: JobSpec) -> dict[str, float]:
    """After the last finished task: the means over the tasks seen and the mean forgetting (0 at first)."""
    last = outcome.tasks[-1]
    metrics = {f"seen_mean/{key}": value for key, value in last.seen_means().items()}
    mean = mean_forgetting(outcome.matrix(f"recall@{spec.evaluation.recall_ks[0]}"), after=last.task)
    metrics["forgetting/mean"] = 0.0 if mean is None else mean
    metrics["task"] = float(last.task)
    return metrics


def _task_epochs(spec: JobSpec, task: int) -> int:
    assert spec.incremental is not None
    return spec.incremental.tasks[task].epochs or spec.train.epochs


def _evaluate(
    spec: JobSpec,
    *,
    method: IncrementalMethod,
    model: torch.nn.Module,
    tasks: Sequence[TaskData],
    task: TaskData,
    specialist: torch.nn.Module | None = None,
) -> TaskOutcome:
    """Scores of the model on the test split of every task so far, and of ch. 7's specialist on its task."""
    ks, batch_size = spec.evaluation.recall_ks, spec.train.embed_batch_size
    scores = {
        seen.index: method.score_task(model, seen, ks=ks, batch_size=batch_size) for seen in tasks[: task.index + 1]
    }
    specialist_scores = (
        None if specialist is None else method.score_task(specialist, task, ks=ks, batch_size=batch_size)
    )
    return TaskOutcome(
        task=task.index, name=task.name, scores=scores, model={}, promoted=False, specialist=specialist_scores
    )


def _log_matrices(spec: JobSpec, *, outcome: IncrementalOutcome, run: TrainingRun) -> None:
    """Log the last task's row, the forgetting, the task x task matrices and their plots."""
    last = outcome.tasks[-1]
    metrics: dict[str, float] = {}
    for seen_index, values in last.scores.items():
        metrics.update({f"task{seen_index}/{key}": value for key, value in values.items()})
    metrics.update({f"seen_mean/{key}": value for key, value in last.seen_means().items()})
    if last.specialist is not None:
        # Beside the student's scores on the new task: the specialist's, and the student's lead over it.
        student = last.scores[last.task]
        for key, value in last.specialist.items():
            metrics[f"task{last.task}/specialist/{key}"] = value
            metrics[f"task{last.task}/student_minus_specialist/{key}"] = student[key] - value
    names = outcome.task_names
    first = f"recall@{spec.evaluation.recall_ks[0]}"
    matrix = outcome.matrix(first)
    for old, value in forgetting(matrix, after=last.task).items():
        metrics[f"forgetting/task{old}"] = value
    mean = mean_forgetting(matrix, after=last.task)
    if mean is not None:
        metrics["forgetting/mean"] = mean
    run.log_metrics(metrics, step=last.task)

    tables = []
    for metric in [first, "map@r"]:
        full = outcome.matrix(metric)
        tables.append(format_matrix(full, task_names=names, metric=metric, markdown=True))
        figure = task_matrix_figure(full, task_names=names, metric=metric, title=f"{spec.name}: {metric}")
        run.log_figure(figure, f"incremental/matrix_{metric.replace('@', '_at_')}.png")
        plt.close(figure)
    figure = task_lines_figure(matrix, task_names=names, metric=first, title=f"{spec.name}: {first} of each task")
    run.log_figure(figure, "incremental/task_recall.png")
    plt.close(figure)
    specialists = [
        f"| {names[item.task]} | {item.scores[item.task][first]:.4f} | {item.specialist[first]:.4f} |"
        for item in outcome.tasks
        if item.specialist is not None
    ]
    if specialists:
        tables.append(
            f"New task, student vs specialist (trained on it alone), {first}:\n\n| task | student | specialist |\n"
            "|---|---|---|\n" + "\n".join(specialists)
        )
    run.client.log_text(run.run_id, "\n\n".join(tables) + "\n", "incremental/matrix.md")
    logger.info("after task %s:\n%s", last.name, format_matrix(matrix, task_names=names, metric=first))


def _register(
    spec: JobSpec,
    *,
    method: IncrementalMethod,
    state_dict: dict[str, torch.Tensor],
    run: TrainingRun,
    task: TaskOutcome,
    promote: bool,
) -> tuple[dict[str, Any], bool]:
    """Register the task's model (the one registration path); champion when the gate holds on the seen-task means."""
    means = task.seen_means()
    with tempfile.TemporaryDirectory() as folder:
        package_dir = save_model_package(Path(folder) / "package", spec=spec, state_dict=state_dict)
        registered, promoted, _ = register_package(
            spec,
            package_dir=package_dir,
            run=run,
            metrics=means,
            tags={
                **method.registration_tags(),
                "retrieval.task": str(task.task),
                "retrieval.task_name": task.name,
                **{f"seen_mean.{key}": f"{value:.6f}" for key, value in means.items()},
            },
            promote_with_gate=promote,
        )
    return {
        "name": registered.name,
        "version": registered.version,
        "aliases": list(registered.aliases),
        "uri": registered.uri,
    }, promoted


def _build_index(
    spec: JobSpec,
    *,
    method: IncrementalMethod,
    model: torch.nn.Module,
    tasks: Sequence[TaskData],
    task: TaskData,
    registered: dict[str, Any],
) -> str:
    """A new index version of the test images of every class seen so far, built with this task's model.

    The method says what the index holds (`IncrementalMethod.task_gallery`); the one index writer writes it.
    """
    content = method.task_gallery(model, tasks, upto=task.index, batch_size=spec.train.embed_batch_size)
    manifest_path = write_gallery_index(
        content,
        job=spec.name,
        code_bits=method.code_bits,
        model=ModelRef(
            name=registered["name"],
            version=str(registered["version"]),
            uri=f"models:/{registered['name']}/{registered['version']}",
        ),
        out_root=spec.index_root,
        num_shards=spec.index.num_shards,
        factory=spec.index.factory,
        metric=spec.index.metric,
        thumbnail_px=spec.index.thumbnail_px,
    )
    manifest, _ = read_manifest(manifest_path)
    logger.info(
        "task %s: index version %s (%d items) at %s",
        task.name,
        manifest.index_version,
        len(content.items),
        manifest_path,
    )
    return manifest.index_version


def _swap(spec: JobSpec, *, index_version: str) -> dict[str, Any]:
    """Ask the running Serve app to swap to `index_version`; a failure is reported, not raised."""
    from retrieval.serving.swap_client import request_swap

    assert spec.incremental is not None and spec.incremental.serve_url is not None
    token = os.environ.get(spec.incremental.admin_token_env)
    if not token:
        message = f"not swapped: the admin token variable {spec.incremental.admin_token_env} is not set"
        logger.error(message)
        return {"ok": False, "error": message}
    try:
        reply = request_swap(spec.incremental.serve_url, index=index_version, token=token)
    except Exception as error:
        logger.error("the swap to %s failed; the previous version keeps serving: %s", index_version, error)
        return {"ok": False, "error": str(error)}
    logger.info("swapped the live index to %s in %.2f s", index_version, reply.get("duration_s", float("nan")))
    return {"ok": True, **reply}


def _log_replay(spec: JobSpec, *, carry: TaskCarry, task: TaskData, run: TrainingRun) -> None:
    """The replay images synthesised after this task (ch. 7), as a captioned grid in MLflow."""
    if carry.replay_images is None or carry.replay_labels is None:
        return
    names = task.train.class_names
    fresh = np.flatnonzero(np.isin(carry.replay_labels.numpy(), task.classes))[:32]
    figure = image_grid_figure(
        carry.replay_images.numpy()[fresh],
        captions=[names[int(label)] for label in carry.replay_labels.numpy()[fresh]],
        mean=spec.dataset.mean,
        std=spec.dataset.std,
        title=f"replay images synthesised from the model after {task.name}",
    )
    run.log_figure(figure, f"incremental/replay_after_task{task.index}.png")
    plt.close(figure)


def _finish_task(spec: JobSpec, *, state_dict: dict[str, torch.Tensor], carry: TaskCarry, task: TaskData) -> TaskCarry:
    """The next task's carry: on a GPU job, a Ray task on one GPU; otherwise here, in the runner.

    The CPU work (a Fisher estimate, a drift measurement, a small synthesis) costs less than
    starting a worker process for it.
    """
    if not spec.scaling.use_gpu:
        return _finish_task_here(spec.model_dump(mode="json"), state_dict, carry, task.index)
    remote = ray.remote(num_cpus=1, num_gpus=1)(_finish_task_here)
    following: TaskCarry = ray.get(remote.remote(spec.model_dump(mode="json"), state_dict, carry, task.index))
    return following


def _finish_task_here(
    spec_json: dict[str, Any], state_dict: dict[str, torch.Tensor], carry: TaskCarry, index: int
) -> TaskCarry:
    spec = JobSpec.from_mapping(spec_json, source="incremental runner")
    assert spec.incremental is not None
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(spec.train.seed + index)
    method = build_method(spec)
    assert isinstance(method, IncrementalMethod)
    tasks = build_task_sequence(dataset=spec.dataset, incremental=spec.incremental)
    model = method.build_model()
    model.load_state_dict(state_dict)
    model.to(device)
    return method.finish_task(model=model, carry=carry, task_data=tasks[index], device=device)


def read_incremental_summary(spec: JobSpec) -> dict[str, Any] | None:
    """The saved summary of an incremental job (None when no task has finished)."""
    return ProgressStore(spec).read_summary()
