"""Sites that refuse a run's work: out of the run's selection until their agent says otherwise.

An agent refuses a request when the server's signed grant does not verify at the site (a clock
two days ahead makes every grant look expired: ``not_authorized``) or when the site's own policy
says no (``policy_refused``). Neither clears by itself, so selecting the silo again would only
make every round wait its full deadline. A refusal therefore excludes the silo from that run's
selection (``federation.selectors.run_refused_silo_ids``), and a round whose remaining selected
silos have all refused closes at once (``selectors.round_refused_count``, ``roundplan``).

The agent "says otherwise" in one of two ways, and either lifts every exclusion of the silo:

- a new ``hello``: the agent reconnected, which is how an operator applies a fixed clock or an
  edited site.toml (they restart the agent);
- a ``ready`` message: the running agent saw its operator record a new decision
  (``quorum-agent approve``) and accepts work again.

If the site still refuses, the next task brings a new refusal and a new exclusion at once: a lift
never costs a round its deadline. Every refusal and every lift is an audit event.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from federation import dispatch
from federation.models import Run, Silo, SiloRefusal
from federation.services.audit import audit_append

log = logging.getLogger("quorum.refusals")

# Agent error codes that mean "this site will not do this run's work" (clientagent.policy).
REFUSAL_CODES = frozenset({"not_authorized", "policy_refused"})


@transaction.atomic
def silo_refusal_record(
    *, silo_id: int, run_id: int, round_number: int | None, code: str, reason: str
) -> bool:
    """Exclude a silo from an active run's selection after its agent refused the run's request.

    Returns whether the refusal counts (a refusal code, an active run the silo takes part in).
    """
    if code not in REFUSAL_CODES:
        return False
    run = (
        Run.objects.select_related("plan")
        .filter(pk=run_id, status__in=Run.ACTIVE, version__silos=silo_id)
        .first()
    )
    if run is None:
        return False
    silo = Silo.objects.get(pk=silo_id)
    now = timezone.now()
    refusal, created = SiloRefusal.objects.select_for_update().get_or_create(
        run=run,
        silo=silo,
        defaults={
            "code": code[:50],
            "reason": reason[:2000],
            "round_number": round_number,
            "since": now,
            "last_at": now,
        },
    )
    if not created:
        refusal.code, refusal.reason = code[:50], reason[:2000]
        refusal.round_number = round_number
        refusal.last_at = now
        refusal.count += 1
        refusal.save(update_fields=["code", "reason", "round_number", "last_at", "count"])
        return True
    audit_append(
        actor="system",
        action="silo.excluded",
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data={"silo": silo.name, "code": code[:50], "round": round_number},
    )
    log.warning("run %s: silo %s refused (%s); not selected again", run.pk, silo.name, code)
    dispatch.publish_live(
        {"type": "live.event", "event": "silo.excluded", "run": run.pk, "silo": silo.name}
    )
    dispatch.enqueue_advance(run.pk)  # a round that only waits for refusers closes now
    return True


@transaction.atomic
def silo_refusals_lift(*, silo_id: int, why: str) -> list[int]:
    """The silo's agent says it accepts work again: lift its exclusions from active runs.

    Returns the runs it may be selected in again.
    """
    refusals = list(
        SiloRefusal.objects.select_for_update()
        .select_related("run__plan", "silo")
        .filter(silo_id=silo_id, run__status__in=Run.ACTIVE)
    )
    for refusal in refusals:
        audit_append(
            actor="system",
            action="silo.readmitted",
            consortium_id=refusal.run.plan.consortium_id,
            object_type="run",
            object_id=refusal.run_id,
            data={"silo": refusal.silo.name, "refused": refusal.count, "why": why},
        )
        dispatch.publish_live(
            {
                "type": "live.event",
                "event": "silo.readmitted",
                "run": refusal.run_id,
                "silo": refusal.silo.name,
            }
        )
        dispatch.enqueue_advance(refusal.run_id)  # a run waiting for silos may start now
        log.info("run %s: silo %s selectable again (%s)", refusal.run_id, refusal.silo.name, why)
    SiloRefusal.objects.filter(pk__in=[r.pk for r in refusals]).delete()
    return [r.run_id for r in refusals]
