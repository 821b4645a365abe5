"""Many inputs on a Dask cluster (`rcam encode/decode --cluster ADDRESS`): rcam.codec.batch's per-file work run
by the cluster's workers instead of local worker processes; planning, skipping, the summary and the failures
stay rcam.codec.batch's.

Each worker loads the model once, itself, from its own weights/ (or the .safetensors path given), through a
worker plugin, so no task carries tensors; a worker whose weights differ from this machine's (digest) codes
nothing. Tasks carry absolute paths: every worker must see the inputs and outputs under the same names (a
shared filesystem), and write_atomic makes each output whole or absent there as here.
"""

from __future__ import annotations

import dataclasses
import itertools
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

import click
import torch
from distributed import Client, WorkerPlugin, as_completed, get_worker

from rcam.codec.batch import Done, InternalFailure, attempt, worker_threads
from rcam.codec.blas import single_threaded_blas
from rcam.codec.zoo import Codec, file_digest, load_codec, resolve_weights
from rcam.errors import RcamError
from rcam.training.train import resolve_device

# Tasks on the scheduler at once: far more than any cluster's threads, yet a million-file archive is never a
# million tasks held by the scheduler (each costs it memory); the next file is submitted as one finishes.
IN_FLIGHT = 1024


class CodecOnWorker(WorkerPlugin):
    """Loads the codec once on every worker (those there now and those that join later) for one batch's tasks."""

    def __init__(self, model_name: str, device: str, threads: int | None, digest: bytes, precision: str = "auto"):
        self.model_name, self.device, self.threads, self.digest, self.precision = model_name, device, threads, digest, precision
        self.codec: Codec | RcamError | InternalFailure | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"codec": None}  # the settings travel, never a loaded model

    def setup(self, worker) -> None:
        """Load the model on `worker`; an error is kept and reported on each file the worker gets, as --jobs does."""
        # A worker running several tasks at once shares its CPUs among them, as --jobs shares this machine's.
        self.threads = worker_threads(worker.state.nthreads, self.threads)
        torch.set_num_threads(self.threads)
        single_threaded_blas()  # as rcam's own processes run (rcam.codec.blas): its threads wait on busy cores
        try:
            codec = load_codec(self.model_name, resolve_device(self.device), precision=self.precision)
            if codec.digest != self.digest:  # a different model would write (or decode to) different pixels
                raise RcamError(
                    f"model '{self.model_name}' there has weights {codec.digest.hex()}, not {self.digest.hex()} as on the "
                    "machine that started the batch: install the same weights on every worker"
                )  # fmt: skip
            self.codec = codec
        except RcamError as error:
            self.codec = RcamError(f"worker {worker.address}: {error}")
        except Exception:  # an rcam bug: reported per file with its traceback, the worker stays up
            self.codec = InternalFailure(f"worker {worker.address}:\n{traceback.format_exc()}")

    def teardown(self, worker) -> None:
        """Free the model when the batch is over."""
        self.codec = None


def code_on_worker(plugin_name: str, work: Callable, source: Path, target: Path) -> Done | RcamError | InternalFailure:
    """One file's work on a Dask worker with the codec its plugin loaded; failures come back as values (not raised,
    so that Dask does not log them as crashed tasks)."""
    plugin = get_worker().plugins[plugin_name]
    if not isinstance(plugin.codec, Codec):
        return plugin.codec
    torch.set_num_threads(plugin.threads)  # for this task's thread: Dask runs tasks on threads of its own
    try:
        return attempt(work, plugin.codec, source, target)
    except (RcamError, InternalFailure) as error:
        return error


def connect(address: str) -> Client:
    """A client of the Dask scheduler at `address` (tcp://host:8786); RcamError when none answers there."""
    try:
        return Client(address, set_as_default=False)
    except (OSError, ValueError) as error:  # OSError: refused or timed out; ValueError: not an address
        raise RcamError(f"--cluster {address}: no Dask scheduler answers there ({error})") from None


def as_given(outcome, source: Path, target: Path):
    """A worker's line or error, naming the paths as the command line did (workers get them absolute)."""
    names = [(str(source.absolute()), str(source)), (str(target.absolute()), str(target))]

    def rename(text: str) -> str:
        for absolute, given in names:
            text = text.replace(absolute, given)
        return text

    if isinstance(outcome, Done):
        return dataclasses.replace(outcome, line=rename(outcome.line))
    if isinstance(outcome, RcamError):
        return RcamError(rename(str(outcome)))
    return outcome


def run_on_cluster(
    address: str, model_name: str, device: str, threads: int | None, precision: str, quiet: bool,
    todo: list[tuple[Path, Path]], work: Callable, finish: Callable,
) -> None:  # fmt: skip
    """rcam.codec.batch.run_batch's runner for a cluster: work(codec, source, target) for every (source, target) of `todo`
    on the workers of the scheduler at `address`, calling finish(source, Done or error) as each file completes.

    Ctrl-C cancels the files not started; those in hand finish (whole) on their workers."""
    if not todo:  # all skipped or refused: no need to load the model on every worker
        return
    _, weights = resolve_weights(model_name)
    client = connect(address)
    plugin_name = f"rcam-codec-{uuid.uuid4().hex}"  # one per batch: two batches on one cluster never share state
    pending: dict = {}
    try:
        threads_by_worker = client.nthreads()
        if not quiet:
            where = f"{len(threads_by_worker)} workers, {sum(threads_by_worker.values())} threads" if threads_by_worker else "no workers yet: waiting for some to join"
            click.echo(f"rcam: cluster {address}: {where}", err=True)
        client.register_plugin(CodecOnWorker(model_name, device, threads, file_digest(weights)[:16], precision), name=plugin_name)
        queue = iter(todo)

        def submit(source: Path, target: Path):
            future = client.submit(code_on_worker, plugin_name, work, source.absolute(), target.absolute(), pure=False)
            pending[future] = (source, target)
            return future

        completed = as_completed([submit(*item) for item in itertools.islice(queue, IN_FLIGHT)], loop=client.loop)
        for future in completed:
            source, target = pending.pop(future)
            try:
                outcome = future.result()
            except Exception as error:  # the task itself failed: its worker died (KilledWorker) or it could not run
                outcome = InternalFailure(f"cluster task failed: {error!r}")
            finish(source, as_given(outcome, source, target))
            for following in itertools.islice(queue, 1):
                completed.add(submit(*following))
    except KeyboardInterrupt:
        client.cancel(list(pending))
        raise
    finally:
        try:
            client.unregister_worker_plugin(plugin_name)
        except Exception:  # the scheduler is gone or never got the plugin: nothing is left to free
            pass
        client.close()
