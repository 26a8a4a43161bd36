"""The site side of the Ray engine: a user's ClientApp as a Flower simulation node runs it.

Kept apart from the engine so a Ray actor that unpickles it imports Flower and nothing
else of Confide: the actors start as fast as under Flower's own simulation.
"""

from __future__ import annotations

import sys
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

#: Reply record where the site wrapper states the partition id of the node that answered.
SITE_RECORD = "confide.site"
#: Message type of the node-map query (answered by the wrapper; the user's app never sees it).
PARTITION_QUERY = "query.confide_partition"
#: Error code of a reply whose ClientApp raised (Flower's own code for that case).
APP_RAISED = 1

_threads_set = False


def _limit_torch_threads(threads: int) -> None:
    """Once per actor process, if the app uses torch: sites share the actor's cores.

    Ray already starts actors with OMP_NUM_THREADS = their CPUs; this pins torch's own
    pool too, without importing torch for apps that do not use it.
    """
    global _threads_set
    torch: Any = sys.modules.get("torch")
    if not _threads_set and torch is not None:
        torch.set_num_threads(threads)
        _threads_set = True


class SimSiteApp(ClientApp):
    """Wraps a site's ClientApp for Flower's simulation engine; picklable to Ray actors.

    The wrapped app sees exactly the message the driver sent and a ``Context`` with
    Flower's ``node_config``, the node's ``state`` and the run's ``run_config``. The
    wrapper answers the partition query itself, stamps each reply with the node's
    partition id, and turns an exception of the app into an error reply (``TypeName:
    text``, as the in-process engine records it) so the node's ``Context`` is kept.
    """

    def __init__(
        self, inner: ClientApp, run_config: dict[str, Any], torch_threads: int = 1
    ) -> None:
        super().__init__()
        self.inner = inner
        self.run_config = dict(run_config)
        self.torch_threads = torch_threads

    def __call__(self, message: Message, context: Context) -> Message:
        _limit_torch_threads(self.torch_threads)
        partition = int(context.node_config.get("partition-id", -1))
        stamp = ConfigRecord({"partition-id": partition})
        if message.metadata.message_type == PARTITION_QUERY:
            return Message(RecordDict({SITE_RECORD: stamp}), reply_to=message)
        # Flower forbids changing a node's run_config, so the app gets its own Context
        # around the node's state (which Flower keeps between rounds).
        site_context = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config={**self.run_config, **context.run_config},
        )
        try:
            reply = self.inner(message, site_context)
        except Exception as e:  # recorded by the driver as the site's failure
            return Message(Error(APP_RAISED, f"{type(e).__name__}: {e}"), reply_to=message)
        finally:
            context.state = site_context.state
            _limit_torch_threads(self.torch_threads)
        if not reply.has_error():
            reply.content.config_records[SITE_RECORD] = stamp
        return reply


def stamped_partition(reply: Message) -> int | None:
    """The partition id a wrapped site stamped on its reply (None for error replies)."""
    if reply.has_error():
        return None
    record = reply.content.config_records.get(SITE_RECORD)
    return None if record is None else int(record["partition-id"])  # type: ignore[arg-type]


def ray_backend(cpus: int) -> dict[str, Any]:
    """Flower's ``backend_config``: ``cpus`` CPUs, one per site, quiet Ray, no dashboard."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "logging_level": "warning",
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }
