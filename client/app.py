"""The medfed Flower ``ClientApp`` (Message API): a relay in deployment, in-process in simulation.

The same app runs on both engines (DESIGN section 1):

* **Deployment** (a SuperNode whose node config names ``site-worker``): every message is
  forwarded to the hospital's own site worker (``medfed site serve``) over a Unix
  socket, and the worker's reply is returned unchanged (client/relay.py). This code,
  which arrives in the coordinator's FAB, touches no data, no keys and no privacy state,
  and imports no torch.
* **Simulation** (a virtual site: Flower's node config has ``partition-id``): the same
  site service (client/site/service.py) runs in-process behind the same interface, with
  the policy of run config ``site-policy`` (``medfed simulate --site-policy FILE``) or
  the research default.

A SuperNode with neither answers every message with an error reply: this ClientApp never
reads a dataset itself.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.relay import WORKER_KEY, relay
from client.replies import error_message
from common.replies import ReplyCode

log = logging.getLogger(__name__)

app = ClientApp()


def dispatch(msg: Message, context: Context) -> Message:
    """Send ``msg`` to the site: the worker's socket in deployment, in-process in simulation."""
    socket = context.node_config.get(WORKER_KEY)
    if isinstance(socket, str) and socket:
        return relay(msg, context.run_config, socket=socket)
    if "partition-id" in context.node_config:
        from client.site.simulated import handle_virtual_site  # torch: simulation only

        return handle_virtual_site(msg, context)
    log.error(
        "this SuperNode has no site worker: set node config %r to the socket of "
        "'medfed site serve' (see README, Hospitals)",
        WORKER_KEY,
    )
    code = ReplyCode.WORKER_UNAVAILABLE
    return error_message(msg, code)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower handler: relay a train message (SecAgg+ stages included) to the site."""
    return dispatch(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Flower handler: relay an evaluate message to the site."""
    return dispatch(msg, context)
