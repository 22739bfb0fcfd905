"""The kernel channels :mod:`lsa.runner`'s notebook client waits on, polled in slices.

A message that reaches a channel while the client waits on it wakes the client through the socket's
edge-triggered file descriptor. In a burst of messages (a cell that builds widgets, after a long cell)
that wake-up can be missed: the reply sits in the socket, the kernel is idle, and the client waits
until the cell timeout (nbclient issue 312; seen here on notebook 01's CircuitViewer cell, the kernel
idle for minutes with the cell's code executed). A wait in slices of :data:`SLICE` seconds polls the
socket again at the end of each slice, which finds the message. ``papermill.execute_notebook(...,
kernel_manager_class=SlicedKernelManager)`` uses these channels for the shell and IOPub replies.
"""

from __future__ import annotations

import time
from queue import Empty

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import DottedObjectName, Type

__all__ = ["SLICE", "SlicedChannel", "SlicedClient", "SlicedKernelManager"]

SLICE = 1.0  # seconds: the longest a missed wake-up delays a reply


class SlicedChannel(AsyncZMQSocketChannel):
    """A kernel channel whose ``get_msg(timeout)`` waits in slices of :data:`SLICE` seconds, each ending in
    a fresh poll of the socket; ``Empty`` once ``timeout`` has passed (``None``: waits until a message)."""

    async def get_msg(self, timeout: float | None = None) -> dict:  # type: ignore[override]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = SLICE if deadline is None else min(SLICE, max(deadline - time.monotonic(), 0.0))
            try:
                return await super().get_msg(timeout=left)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise


class SlicedClient(AsyncKernelClient):
    """A kernel client whose shell and IOPub channels are :class:`SlicedChannel`."""

    shell_channel_class = Type(SlicedChannel)
    iopub_channel_class = Type(SlicedChannel)


class SlicedKernelManager(AsyncKernelManager):
    """The notebook client's kernel manager, handing out :class:`SlicedClient`."""

    client_class = DottedObjectName("lsa.kernel_client.SlicedClient")
