"""The trio <-> asyncio / threads bridge: the ONLY module of the package that mixes them.

py-libp2p runs on trio; Ray async actors and notebooks run asyncio; scripts are synchronous.
A :class:`TrioPortal` owns one daemon thread running ``trio.run``. Work crosses over in
both directions:

- *into* trio: :meth:`TrioPortal.submit` schedules a trio async function from any thread
  and returns a ``concurrent.futures.Future``; :meth:`run` blocks on it with a timeout and
  :meth:`arun` awaits it from asyncio (``asyncio.wrap_future``). Cancelling the future (an
  asyncio task cancelled, a sync timeout) cancels the trio task.
- *out of* trio: :meth:`to_trio_handler` turns a user handler - a plain function (run on
  the portal's worker threads) or an ``async def`` (run on the asyncio loop it was
  registered from) - into a trio async function, so the network thread never runs user code.

Shutdown (:meth:`stop`) cancels the trio main task, joins the thread and the worker threads:
nothing is left running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from p2p._exceptions import NodeClosedError, P2PError, P2PTimeoutError
from p2p._util import collapse_groups

__all__ = ["TrioPortal"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
_STOPPED = "the p2p node is closed (or was never started); call Node.start()"


class _Job:
    """One submitted trio call and the cancel scope that stops it."""

    def __init__(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.future: cf.Future[Any] = cf.Future()
        self.scope: trio.CancelScope | None = None
        self.cancelled = False

    def cancel(self) -> None:  # in the trio thread
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class TrioPortal:
    """A trio event loop in a background thread, callable from threads and asyncio.

    Args:
        name: the thread's name (shows in ``threading.enumerate()``).
        worker_threads: threads that run synchronous user handlers.

    Example:
        >>> portal = TrioPortal("p2p")
        >>> portal.start(service)            # service(task_status=...) runs until stop()   # doctest: +SKIP
        >>> portal.run(trio.sleep, 0.1, timeout=1)                                          # doctest: +SKIP
        >>> portal.stop()                                                                   # doctest: +SKIP
    """

    def __init__(self, name: str, worker_threads: int = 8) -> None:
        self._name = name
        self._workers = worker_threads
        self._executor: cf.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stop_timeout = 10.0
        self._shutdown: Callable[[], Awaitable[None]] | None = None

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._token is not None and not self._stopping

    def start(self, service: Callable[..., Awaitable[Any]], timeout: float = 30.0,
              shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run ``service(task_status=...)`` in the trio thread; return once it called
        ``task_status.started()``.

        Args:
            service: the trio task to run until :meth:`stop`.
            timeout: seconds to wait for it to start.
            shutdown: awaited on :meth:`stop` *before* anything is cancelled (bounded by
                the stop timeout), so connections close cleanly rather than mid-cancel.

        Raises:
            P2PError: the service failed to start (its own P2PError, or one whose
                ``__cause__`` is what it raised).
            P2PTimeoutError: it did not start within ``timeout`` seconds.
        """
        with self._lock:
            if self._thread is not None:
                raise P2PError("this node was already started; create a new Node to restart")
            self._executor = cf.ThreadPoolExecutor(self._workers,
                                                   thread_name_prefix=f"{self._name}-handler")
            self._shutdown = shutdown
            self._thread = threading.Thread(target=self._thread_main, args=(service,),
                                            name=self._name, daemon=True)
            self._thread.start()
        if not self._started.wait(timeout):
            self.stop(timeout=timeout)
            raise P2PTimeoutError(f"the p2p node did not start within {timeout:g}s",
                                  timeout=timeout)
        if self._startup_error is not None:
            self.stop(timeout=timeout)
            if isinstance(self._startup_error, P2PError):
                raise self._startup_error
            raise P2PError(f"the p2p node failed to start: {self._startup_error!r}") \
                from self._startup_error

    def _thread_main(self, service: Callable[..., Awaitable[Any]]) -> None:
        try:
            trio.run(self._trio_main, service)
        except BaseException as err:  # reported to start(); the thread must not die noisily
            if not self._started.is_set():
                self._startup_error = err
            else:
                logger.exception("the p2p network thread failed")
        finally:
            self._token = None
            self._started.set()

    async def _trio_main(self, service: Callable[..., Awaitable[Any]]) -> None:
        self._stop = trio.Event()
        with collapse_groups():
            await self._serve(service)

    async def _serve(self, service: Callable[..., Awaitable[Any]]) -> None:
        assert self._stop is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(service)
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()
            if self._shutdown is not None:
                with trio.move_on_after(self._stop_timeout):
                    try:
                        await self._shutdown()
                    except Exception:
                        logger.exception("p2p graceful shutdown failed; cancelling")
            nursery.cancel_scope.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything in the trio thread, join it and the worker threads (idempotent).

        Pending calls fail with :class:`~p2p.NodeClosedError`.
        """
        with self._lock:
            self._stopping = True
            self._stop_timeout = timeout
            token, thread, executor = self._token, self._thread, self._executor
            self._executor = None
        if token is not None:
            try:
                token.run_sync_soon(self._set_stop)
            except trio.RunFinishedError:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("the p2p network thread did not stop within %gs", timeout)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _set_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # ---------------------------------------------------------------- into trio
    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> cf.Future[T]:
        """Schedule ``await fn(*args)`` in the trio thread (thread-safe).

        Returns:
            A future; cancelling it cancels the trio task.
        """
        job = _Job(fn, args)
        token = self._token
        if token is None or self._stopping:
            job.future.set_exception(NodeClosedError(_STOPPED))
            return job.future
        try:
            token.run_sync_soon(self._spawn, job)
        except trio.RunFinishedError:
            job.future.set_exception(NodeClosedError(_STOPPED))
            return job.future

        def on_done(fut: cf.Future[Any]) -> None:
            if fut.cancelled():
                try:
                    token.run_sync_soon(job.cancel)
                except trio.RunFinishedError:
                    pass

        job.future.add_done_callback(on_done)
        return job.future

    def _spawn(self, job: _Job) -> None:
        if self._nursery is None or self._stop is None or self._stop.is_set():
            job.future.set_exception(NodeClosedError(_STOPPED))
            return
        self._nursery.start_soon(self._run_job, job)

    async def _run_job(self, job: _Job) -> None:
        with trio.CancelScope() as scope:
            job.scope = scope
            if job.cancelled or job.future.cancelled():
                return
            try:
                result = await job.fn(*job.args)
            except trio.Cancelled:
                _settle(job.future, exc=NodeClosedError(_STOPPED)) if self._stopping \
                    else job.future.cancel()
                raise
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                _settle(job.future, exc=err)
            else:
                _settle(job.future, result=result)
        if not job.future.done():
            job.future.cancel()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float) -> T:
        """Blocking: ``await fn(*args)`` in the trio thread, at most ``timeout`` seconds.

        Raises:
            P2PTimeoutError: it took longer (the trio task is cancelled).
            RuntimeError: called from the network thread itself (it would deadlock).
            Anything ``fn`` raises.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("blocking p2p calls cannot run on the p2p network thread")
        future = self.submit(fn, *args)
        done, _ = cf.wait([future], timeout)
        if not done:  # (cf.TimeoutError from result() would also catch fn's own timeouts)
            future.cancel()
            raise P2PTimeoutError(f"p2p call took longer than {timeout:g}s", timeout=timeout)
        return future.result()

    async def arun(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: ``await fn(*args)`` in the trio thread; cancellation crosses over."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    # ---------------------------------------------------------------- out of trio
    def to_trio_handler(self, fn: Callable[..., Any],
                        loop: asyncio.AbstractEventLoop | None = None
                        ) -> Callable[..., Awaitable[Any]]:
        """Wrap a user handler so trio can await it without running user code itself.

        Args:
            fn: a plain function (runs on a worker thread) or an ``async def`` (runs on
                ``loop``).
            loop: the asyncio loop for an ``async def``; default: the running loop.

        Raises:
            P2PError: ``fn`` is async, no ``loop`` was given and no loop is running.
        """
        if inspect.iscoroutinefunction(fn):
            if loop is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError as err:
                    raise P2PError(f"async handler {fn.__name__} needs an event loop: register "
                                   "it from inside one, or pass loop=") from err
            target = loop

            async def run_async(*args: Any) -> Any:
                return await _wait(asyncio.run_coroutine_threadsafe(fn(*args), target))

            return run_async

        async def run_sync(*args: Any) -> Any:
            executor = self._executor
            if executor is None:
                raise NodeClosedError(_STOPPED)
            return await _wait(executor.submit(fn, *args))

        return run_sync


def _settle(future: cf.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Complete ``future`` unless the caller cancelled it meanwhile."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except cf.InvalidStateError:
        pass


async def _wait(future: cf.Future[T]) -> T:
    """In trio: wait for a concurrent future without blocking the loop; cancel it on cancel."""
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: cf.Future[Any]) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    future.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        future.cancel()
        raise
    return future.result()
