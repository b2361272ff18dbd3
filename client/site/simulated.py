"""Virtual sites of a simulation: the site service in-process, behind the same interface.

Flower's simulation engine calls the ClientApp with a node config holding
``partition-id``; the ClientApp hands the message here. The site service is exactly the
one the worker runs (client/site/service.py), with the policy named by run config
``site-policy`` (``medfed simulate --site-policy FILE``), or :func:`research_policy`.

Only here is the simulation's fault injection (client/faults.py, run config
``faults.*``) mounted in the service's chain (:data:`FAULT_MODS`): a site worker
(``medfed site serve``) never has it.
"""

from __future__ import annotations

import dataclasses
import logging

from flwr.app import Context, Message

from client.faults import InjectedFault, fault_injection, stage_fault_injection
from client.site.policy import SitePolicy
from client.site.service import SiteMods, SiteService

log = logging.getLogger(__name__)

#: The simulation's fault injection in the site service's chain: ``faults.drop-site``
#: outside SecAgg+ (it stops answering at a SecAgg+ stage), dropout, slow site and
#: crash inside it, around training; the injected crash leaves the service as
#: :class:`~client.faults.InjectedFault`, so Flower sees the ClientApp fail.
FAULT_MODS = SiteMods(
    outer=(stage_fault_injection,), inner=(fault_injection,), crashes=(InjectedFault,)
)


def simulated_service(policy: SitePolicy) -> SiteService:
    """Return the site service of a virtual site: the worker's, plus fault injection."""
    return SiteService(policy=policy, simulated=True, mods=FAULT_MODS)


def research_policy() -> SitePolicy:
    """Return the policy of a virtual site when the researcher names none.

    The hospital default (:meth:`SitePolicy.default`) with the limits that would stop
    research runs lifted: DP and SecAgg+ may be off (to measure their cost), any number
    of rounds, epochs and evaluations, finer metric rounding. The epsilon ceiling,
    delta rule and noise floor stay the default's.
    """
    default = SitePolicy.default()
    return dataclasses.replace(
        default,
        require_dp=False,
        require_secagg=False,
        min_secagg_sites=2,
        max_rounds=1_000_000,
        max_local_epochs=1_000,
        max_evaluations_per_run=1_000_000,
        min_eval_images=1,
        metric_decimals=6,
        min_noise_multiplier=0.0,
    )


def handle_virtual_site(msg: Message, context: Context) -> Message:
    """Run one message of a virtual site through the site service, in-process.

    Raises
    ------
    ConfigError
        If run config ``site-policy`` names a policy file that does not load.
    """
    path = context.run_config.get("site-policy")
    policy = SitePolicy.load(path) if isinstance(path, str) and path else research_policy()
    return simulated_service(policy).handle(msg, context)
