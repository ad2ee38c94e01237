"""`manage.py demo`: a real federation on public data, from one command.

It creates the consortium, its organisations and silos (with agent tokens), writes each site's
CSV and site.toml into the site's own folder, starts the ASGI server in this process, launches one
real `quorum-agent` process per site, runs the plan with a progress display and prints the
federated model next to two baselines the demo computes for comparison only: a model trained
centrally on the pooled training rows, and each site's local-only model. All three are evaluated
on the union of the sites' held-out splits.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from fedcore import approvals, signing, tensors
from fedcore.plan import MITIGATION_KINDS, parse_plan
from federation.demo.baselines import TASK_SCORES, evaluate_comparison
from federation.demo.scenarios import SCENARIOS, Scenario
from federation.demo.survival import survival_lines, survival_summary
from federation.models import (
    Consortium,
    ModelVersion,
    Organization,
    Role,
    Round,
    Run,
    Silo,
    TrainingPlan,
)
from federation.server import ServerThread, free_port, port_in_use
from federation.services.consortia import consortium_create, organization_create
from federation.services.errors import Conflict
from federation.services.members import membership_accept, membership_add
from federation.services.plans import plan_approve, plan_edit, plan_propose
from federation.services.runs import run_start
from federation.services.silos import silo_admit, silo_register, silo_set_budget
from federation.signing import server_public_key_text
from federation.storage import blob_store

# Column headings of the comparison table (the task's figures, baselines.TASK_SCORES).
SCORE_NAMES = {
    "auc": "AUC",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R2",
}


class Command(BaseCommand):
    help = (
        "Run a real federated training demo (server + one agent process per site) and compare it."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="healthcare")
        parser.add_argument("--rounds", type=int, default=None, help="rounds (default: the plan's)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--no-serve", action="store_true", help="exit after the run")
        parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000, help="dashboard port when serving")
        parser.add_argument("--sites", type=int, default=None, help="use only the N largest sites")
        parser.add_argument(
            "--max-rows", type=int, default=None, help="keep at most N rows per site (quick runs)"
        )
        parser.add_argument("--timeout", type=float, default=900.0, help="give up after N seconds")
        parser.add_argument(
            "--dp",
            choices=["none", "sample", "client"],
            default="none",
            help="differential privacy: DP-SGD at each site (sample) or DP-FedAvg (client)",
        )
        parser.add_argument(
            "--target-epsilon", type=float, default=3.0, help="with --dp: epsilon per silo per run"
        )
        parser.add_argument(
            "--budget",
            type=float,
            default=None,
            help="with --dp: each silo's privacy budget (default: 1.2 x the target)",
        )
        parser.add_argument(
            "--secagg",
            action="store_true",
            help="secure aggregation: the server only ever sees the sum of the sites' updates",
        )
        parser.add_argument(
            "--fairness-mitigation",
            choices=MITIGATION_KINDS,
            default="none",
            help=(
                "the plan's fairness.mitigation kind (docs/fairness.md, 'Mitigation'); the "
                "sensitive attribute is sex in both scenarios (finance: German credit's sex, "
                "from its personal-status column), with a demographic parity limit of 0.1"
            ),
        )
        parser.add_argument(
            "--postprocess-rows",
            choices=("held_out", "training"),
            default=None,
            help=(
                "with --fairness-mitigation postprocess: the rows the thresholds are chosen on "
                "(fairness.mitigation.rows; default held_out, the plan language's). training: "
                "the --json line's disparities are then out of sample, on rows the thresholds "
                "never saw"
            ),
        )
        parser.add_argument(
            "--fairness-epsilon",
            type=float,
            default=None,
            help=(
                "the plan's fairness.dp_epsilon: every group count table and score histogram a "
                "site releases is noised (discrete Laplace) and charged to its ledger; needed "
                "with --secagg for reweighing, constraint and postprocess"
            ),
        )
        parser.add_argument(
            "--strategy",
            default=None,
            help="aggregation strategy (fedavg, fedprox, fedadam, median, trimmed_mean, krum, ...)",
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        started = time.monotonic()
        if opts["scenario"] == "survival":  # analysis runs, not training
            self.handle_analyses(opts, started)
            return
        if opts["rounds"] is not None and opts["rounds"] < 1:
            raise CommandError("--rounds must be at least 1")
        call_command("migrate", verbosity=0, interactive=False)
        scenario = _prepare_scenario(opts)
        home = settings.QUORUM_HOME / "demo" / scenario.name
        _reset(scenario, home)
        budget = None
        if opts["dp"] != "none":
            budget = opts["budget"] if opts["budget"] is not None else 1.2 * opts["target_epsilon"]
        steward_keys = _steward_keys(scenario, home)
        plan, tokens, users, scientist = _create_consortium(
            scenario, budget=budget, steward_keys=steward_keys
        )

        serve = not opts["no_serve"]
        port = opts["port"] if serve else free_port(opts["host"])
        if port_in_use(opts["host"], port):
            raise CommandError(f"port {port} is in use: stop what runs there or pass --port N")
        server = ServerThread(opts["host"], port)
        server.start()
        if opts["verbosity"] < 2:  # the server runs in this process: keep its log off the table
            logging.getLogger("quorum").setLevel(logging.WARNING)
        self.say(f"Quorum server on {server.http_url} (agents connect to {server.ws_url})")
        agents: dict[str, subprocess.Popen[bytes]] = {}
        # SIGTERM stops the demo as Ctrl-C does: the agents and the server go down with it.
        previous_term = _stop_on_sigterm()
        serving = False
        try:
            agents = _launch_agents(
                scenario,
                home,
                tokens,
                server.ws_url,
                server_public_key_text(),
                {site: signing.public_key_text(key) for site, key in steward_keys.items()},
            )
            _wait_online(list(tokens), agents, timeout=120.0)
            self.say(
                f"{len(agents)} site agents connected; starting '{plan.name}' "
                f"({plan.current_version.spec_hash[:12]})"
            )
            run = run_start(actor=scientist, plan=plan)
            run = self.watch(run, agents, deadline=started + opts["timeout"])
            fed_seconds = time.monotonic() - started
            if run.status != Run.Status.COMPLETED:
                raise CommandError(f"the run {run.status}: {run.error}\n{_log_tails(agents)}")
            final = ModelVersion.objects.filter(run=run).order_by("-number").first()
            state = tensors.decode_state_dict(blob_store().get(final.blob_key))
            if not serve:
                _stop_agents(agents)
                agents = {}
            self.say("Training baselines for comparison (centralized, local-only)...")
            comparison = evaluate_comparison(scenario, run.preprocessing, state, seed=opts["seed"])
            result = {
                "scenario": scenario.name,
                "rounds": run.rounds,
                "seconds": round(time.monotonic() - started, 2),
                "federation_seconds": round(fed_seconds, 2),
                "secure_aggregation": bool(opts["secagg"]),
                "round_seconds": _round_seconds(run),
                "run": run.pk,
                "plan_hash": run.plan_hash,
                # what the run itself reports: the final model pooled from the sites' histograms
                "final_evaluation": (run.evaluation or {}).get("metrics"),
                **comparison,
            }
            if opts["dp"] != "none":
                result["privacy"] = _privacy_report(run, scenario, scientist)
            fairness_result = _fairness_result(run)
            if fairness_result is not None:  # the final model against the plan's limit
                result["fairness"] = fairness_result
            self.print_table(result)
            if "privacy" in result:
                self.print_privacy(result["privacy"])
            self.print_users(users, server.http_url)
            if opts["json"]:
                self.stdout.write(json.dumps(result, sort_keys=True))
            if serve:
                next_plan, not_ready = _prepare_next_run(plan, scientist, steward_keys)
                self.print_next_steps(
                    server.http_url,
                    home,
                    agents,
                    next_plan,
                    not_ready,
                    port=port,
                    host=opts["host"],
                )
                self.say(f"\nDashboard: {server.http_url}  (Ctrl-C to stop)")
                serving = True
                while server.thread.is_alive():
                    time.sleep(0.5)
                    gone = [s for s, p in agents.items() if p.poll() is not None]
                    for site in gone:
                        self.say(f"site agent {site} exited ({agents.pop(site).returncode})")
        except KeyboardInterrupt:
            if not serving:
                self.say("Interrupted: stopping the site agents and the server.")
                raise CommandError("interrupted before the demo finished") from None
        finally:
            if agents:
                self.say(f"Stopping {len(agents)} site agents and the server...")
            _stop_agents(agents)
            server.stop()
            signal.signal(signal.SIGTERM, previous_term)
        if serve:
            self.say("Stopped.")

    def handle_analyses(self, opts: dict[str, Any], started: float) -> None:
        """An analysis scenario: its analysis plans proposed, approved by every steward (signed)
        and run one after another by the same server and site agents (docs/analytics.md)."""
        training_only = ("rounds", "sites", "max_rows", "strategy")
        for option in training_only:
            if opts[option] is not None:
                raise CommandError(f"--{option.replace('_', '-')} applies to training scenarios")
        if opts["dp"] != "none" or opts["secagg"]:
            raise CommandError("--dp and --secagg apply to training scenarios")
        call_command("migrate", verbosity=0, interactive=False)
        scenario = SCENARIOS[opts["scenario"]](seed=opts["seed"])
        home = settings.QUORUM_HOME / "demo" / scenario.name
        _reset(scenario, home)
        steward_keys = _steward_keys(scenario, home)
        plan, tokens, users, scientist = _create_consortium(scenario, steward_keys=steward_keys)
        serve = not opts["no_serve"]
        port = opts["port"] if serve else free_port(opts["host"])
        if port_in_use(opts["host"], port):
            raise CommandError(f"port {port} is in use: stop what runs there or pass --port N")
        server = ServerThread(opts["host"], port)
        server.start()
        if opts["verbosity"] < 2:
            logging.getLogger("quorum").setLevel(logging.WARNING)
        self.say(f"Quorum server on {server.http_url} (agents connect to {server.ws_url})")
        self.say(scenario.notes)
        agents: dict[str, subprocess.Popen[bytes]] = {}
        previous_term = _stop_on_sigterm()
        serving = False
        try:
            agents = _launch_agents(
                scenario,
                home,
                tokens,
                server.ws_url,
                server_public_key_text(),
                {site: signing.public_key_text(key) for site, key in steward_keys.items()},
            )
            _wait_online(list(tokens), agents, timeout=120.0)
            self.say(f"{len(agents)} site agents connected")
            silos = list(plan.current_version.silos.all())
            results = []
            for index, spec in enumerate(scenario.analyses):
                if index:
                    plan = plan_propose(
                        actor=scientist,
                        consortium=plan.consortium,
                        name=spec["name"],
                        description=scenario.notes,
                        spec=spec,
                        silos=silos,
                        submit=True,
                    )
                    _approve_as_stewards(plan, steward_keys)
                run = self.watch(
                    run_start(actor=scientist, plan=plan),
                    agents,
                    deadline=started + opts["timeout"],
                )
                if run.status != Run.Status.COMPLETED:
                    raise CommandError(f"'{plan.name}' {run.status}: {run.error}")
                steps = run.analysis["steps"]
                self.say(f"run {run.pk} '{plan.name}': released after {len(steps)} step(s)")
                results.append(run.analysis["result"])
            for line in survival_lines(results):
                self.say(line)
            result = survival_summary(scenario, results)
            result["seconds"] = round(time.monotonic() - started, 2)
            self.say(f"{len(results)} governed analysis runs in {result['seconds']} s")
            self.print_users(users, server.http_url)
            if opts["json"]:
                self.stdout.write(json.dumps(result))
            if serve:
                self.say(
                    f"\nThe {len(agents)} site agents keep running; the analyses' results are "
                    f"under Runs. Dashboard: {server.http_url}  (Ctrl-C to stop)"
                )
                serving = True
                while server.thread.is_alive():
                    time.sleep(0.5)
        except KeyboardInterrupt:
            if not serving:
                self.say("Interrupted: stopping the site agents and the server.")
                raise CommandError("interrupted before the demo finished") from None
        finally:
            _stop_agents(agents)
            server.stop()
            signal.signal(signal.SIGTERM, previous_term)
        if serving:
            self.say("Stopped.")

    def say(self, text: str) -> None:
        """Print a progress line."""
        self.stdout.write(text)
        self.stdout.flush()

    def watch(
        self, run: Run, agents: dict[str, subprocess.Popen[bytes]], *, deadline: float
    ) -> Run:
        """Print a line per completed round until the run ends."""
        reported: set[int] = set()
        while True:
            run.refresh_from_db()
            for round_ in (
                Round.objects.filter(run=run, status=Round.Status.COMPLETED)
                .exclude(pk__in=reported)
                .order_by("number")
            ):
                reported.add(round_.pk)
                self.say(_round_line(run, round_))
            if not run.active:
                return run
            if all(p.poll() is not None for p in agents.values()):
                raise CommandError(f"every site agent exited.\n{_log_tails(agents)}")
            if time.monotonic() > deadline:
                raise CommandError(f"the run did not finish in time (status {run.status})")
            time.sleep(0.2)

    def print_next_steps(
        self,
        url: str,
        home: Path,
        agents: dict[str, subprocess.Popen[bytes]],
        plan: TrainingPlan,
        ready: str | None,
        *,
        port: int,
        host: str,
    ) -> None:
        """What a user can do next with the federation the demo leaves running, and how to stop
        and start its parts."""
        python = _shell_path(Path(sys.executable))
        sites = _shell_path(home / "sites")
        self.say("\nNext steps")
        self.say(
            f"  The {len(agents)} site agents keep running while the dashboard is served, so a "
            "run started in the dashboard trains at once:"
        )
        for site, proc in agents.items():
            self.say(f"    {site:<12} pid {proc.pid:<8} log {sites}/{site}/agent.log")
        if ready is None:
            self.say(
                f"  Start a run: sign in as scientist, open {url}plans/{plan.pk}/ and press "
                "Start a run (every steward approved it, signed with their key)."
            )
        else:
            self.say(f"  Plan '{plan.name}' is not ready for another run: {ready}")
        self.say("  Stop everything: Ctrl-C here (or kill " + str(os.getpid()) + ").")
        self.say(
            "  Stop one site's agent: kill <its pid> (it stops cleanly on SIGTERM); start it "
            "again with:"
        )
        self.say(f"    {python} -m clientagent run --config {sites}/<site>/site.toml")
        self.say("  After Ctrl-C, serve the same demo again (its database and keys are kept):")
        self.say(f"    {python} manage.py serve --host {host} --port {port}")
        self.say(
            f"    and start each site's agent with the line above (one per folder in {sites})."
        )

    def print_privacy(self, privacy: dict[str, Any]) -> None:
        """Per silo: epsilon reported by its agent, the ledger's composed total, the budget."""
        self.say(
            f"\nPrivacy ({privacy['mode']}-level DP, target epsilon {privacy['target_epsilon']}, "
            f"delta {privacy['delta']}):"
        )
        self.say(
            f"{'silo':<12} {'agent reported':>14} {'ledger':>8} {'accountant':>10} {'budget':>7}"
        )
        for site, row in privacy["silos"].items():
            reported = "—" if row["reported"] is None else f"{row['reported']:.4f}"
            self.say(
                f"{site:<12} {reported:>14} {row['ledger']:>8.4f} {row['accountant']:>10.4f} "
                f"{row['budget']:>7.2f}"
            )
        self.say(f"A second run of the same plan: {privacy['second_run']}")

    def print_users(self, users: list[DemoUser], url: str) -> None:
        """The demo accounts, one per role (passwords are new on every demo run)."""
        self.say(f"\nDemo users (log in at {url}):")
        self.say(f"{'username':<20} {'role':<18} {'organization':<36} password")
        for u in users:
            self.say(f"{u.username:<20} {u.role:<18} {u.organization[:36]:<36} {u.password}")

    def print_table(self, result: dict[str, Any]) -> None:
        """The comparison table."""
        rows = [
            ("federated (Quorum)", result["federated"]),
            ("centralized (pooled rows)", result["centralized"]),
        ]
        rows += [(f"local only: {site}", m) for site, m in result["local_only"].items()]
        columns = TASK_SCORES[result.get("task", "binary")]
        self.say("")
        self.say(f"{'model':<32} " + " ".join(f"{SCORE_NAMES[c]:>9}" for c in columns))
        self.say("-" * (33 + 10 * len(columns)))
        for name, m in rows:
            self.say(f"{name:<32} " + " ".join(f"{m[c]:>9.4f}" for c in columns))
        self.say(
            f"\nEvaluated on the union of the sites' held-out splits. {result['rounds']} rounds, "
            f"{result['seconds']:.1f} s in all."
        )
        final = result.get("final_evaluation")
        if final and result.get("task", "binary") != "binary":
            self.say(
                "The run's own final evaluation (pooled exactly from the sites' sums): "
                + ", ".join(f"{SCORE_NAMES[c]} {final[c]:.4f}" for c in columns)
                + f" on {final['n']} held-out rows."
            )
        elif final and final.get("auc") is not None:
            self.say(
                f"The run's own final evaluation (pooled from the sites' score histograms): AUC "
                f"{final['auc']:.4f} (within {final['auc_error_bound']:.1e} of the exact value), "
                f"accuracy {final['accuracy']:.4f} on {final['n']} held-out rows."
            )
        if result.get("secure_aggregation"):
            self.say(
                "Secure aggregation: every round, the server saw only the sum of the sites' "
                "masked updates; no site's update was stored."
            )


def _privacy_report(run: Run, scenario: Scenario, scientist: Any) -> dict[str, Any]:
    """What each silo's data spent: its agent's report, the ledger, the accountant recomputed.

    Then proposes the same plan again: with each silo's budget below twice the target, its
    approval must be refused (the projection composed with the ledger exceeds the budget).
    """
    from fedcore.privacy import accounting
    from federation import ledger
    from federation.models import PrivacyLedgerEntry
    from federation.services.errors import Conflict

    privacy = run.version.spec["privacy"]
    silos: dict[str, Any] = {}
    for silo in run.version.silos.order_by("name"):
        entries = list(PrivacyLedgerEntry.objects.filter(silo=silo).order_by("created_at", "pk"))
        history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
        # Sample-level DP: the epsilon the site's agent reported with its last update.
        reported = next(
            (
                e.epsilon_reported
                for e in reversed(entries)
                if e.run_id == run.pk and e.epsilon_reported is not None
            ),
            None,
        )
        silos[silo.name] = {
            "reported": reported,
            "ledger": entries[-1].epsilon_total if entries else 0.0,
            "accountant": accounting.epsilon_of_history(
                history, delta=ledger.ledger_delta(silo), accountant=ledger.ACCOUNTANT
            )
            if history
            else 0.0,
            "budget": silo.epsilon_budget,
        }
    try:
        again = plan_propose(
            actor=scientist,
            consortium=run.plan.consortium,
            name=f"{run.plan.name} (again)",
            description="the same plan, proposed a second time",
            # the stored spec carries the first plan's name and description (hashed with it)
            spec={k: v for k, v in run.version.spec.items() if k not in ("name", "description")},
            silos=list(run.version.silos.all()),
            submit=True,
        )
        steward = get_user_model().objects.get(username=f"steward-{next(iter(scenario.sites))}")
        plan_approve(actor=steward, plan=again, plan_hash=again.current_version.spec_hash)
        second = "approved (the budgets still afford it)"
    except Conflict as exc:
        second = f"cannot be approved: {exc}"
    return {
        "mode": privacy["mode"],
        "target_epsilon": privacy.get("target_epsilon"),
        "delta": privacy.get("delta"),
        "silos": silos,
        "second_run": second,
    }


def _stop_on_sigterm() -> Any:
    """Make SIGTERM raise KeyboardInterrupt, as Ctrl-C does; returns the previous handler."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _shell_path(path: Path) -> str:
    """A path as a user types it: relative to the current folder when it lies below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _approve_as_stewards(plan: TrainingPlan, steward_keys: dict[str, Any]) -> None:
    """Every participating silo's steward approves the plan's current hash, signed with their
    own key (what `quorum-agent steward-key sign` prints), which each site pins."""
    plan_hash = plan.current_version.spec_hash
    for silo in plan.current_version.silos.select_related("organization").order_by("name"):
        steward = get_user_model().objects.get(username=f"steward-{silo.name}")
        signature = approvals.sign_approval(
            steward_keys[silo.name],
            consortium=plan.consortium.name,
            organization=silo.organization.name,
            plan_hash=plan_hash,
        )
        plan_approve(actor=steward, plan=plan, plan_hash=plan_hash, signature=signature)


@transaction.atomic
def _prepare_next_run(
    plan: TrainingPlan, scientist: Any, steward_keys: dict[str, Any]
) -> tuple[TrainingPlan, str | None]:
    """Leave a plan approved for another run from the dashboard: the plan and None, or the
    plan and why it is not approved.

    A plan runs once per approved version: the scientist makes version 2 (the same spec, the
    description says why) and every steward approves its hash with a signature, as before the
    first run. With DP, the silos' budgets may not afford a second run: that refusal is the
    answer then.
    """
    plan.refresh_from_db()
    current = plan.current_version
    try:
        plan_edit(
            actor=scientist,
            plan=plan,
            spec=current.spec,
            silos=list(current.silos.all()),
            description=f"{plan.description}\n\nVersion 2: the same spec, approved again by the "
            "demo for a run from the dashboard.".strip(),
        )
        plan.refresh_from_db()  # its current version is now version 2
    except ValidationError:
        # Without the description in the hash, the same spec cannot be a new version: the
        # plan is then proposed afresh under a new name.
        plan = plan_propose(
            actor=scientist,
            consortium=plan.consortium,
            name=f"{plan.name} (second run)",
            description=plan.description,
            spec=current.spec,
            silos=list(current.silos.all()),
            submit=True,
        )
    try:
        with transaction.atomic():
            _approve_as_stewards(plan, steward_keys)
    except Conflict as exc:
        return plan, str(exc)
    plan.refresh_from_db()
    if plan.status != TrainingPlan.Status.APPROVED:
        return plan, f"it is {plan.status} after every steward approved it"
    return plan, None


def _fairness_result(run: Run) -> dict[str, Any] | None:
    """The final model's disparities for the plan's sensitive attribute (the --json line's
    ``fairness``): from the run's final evaluation (pooled held-out rows, decisions at 0.5); with
    ``postprocess`` thresholds, of the thresholded decisions on the same rows (their expected
    rates over the rules' randomisation; ``in_sample`` true when the thresholds were chosen on
    those rows, rows "held_out", false with rows "training"). None for a plan without a
    fairness section."""
    settings = parse_plan(run.version.spec).fairness
    if settings is None:
        return None
    evaluation = run.evaluation or {}
    attribute = settings.sensitive_attribute
    report = (
        ((evaluation.get("fairness") or {}).get("attributes") or {}).get(attribute) or {}
    ).get("report") or {}
    result = {
        "attribute": attribute,
        "limit": settings.max_demographic_parity_difference,
        "mitigation": settings.mitigation.kind,
        "decisions": "the final model at 0.5",
        "demographic_parity_difference": report.get("demographic_parity_difference"),
        "equalized_odds_difference": report.get("equalized_odds_difference"),
    }
    thresholded = evaluation.get("thresholded_fairness") if evaluation.get("thresholds") else None
    if thresholded:
        for metric in ("demographic_parity_difference", "equalized_odds_difference"):
            result[metric] = thresholded[metric]
        result["decisions"] = "the final model's group thresholds (postprocess)"
        result["in_sample"] = thresholded["in_sample"]
        result["in_sample_note"] = thresholded["note"]
        result["unthresholded"] = {
            "demographic_parity_difference": report.get("demographic_parity_difference"),
            "equalized_odds_difference": report.get("equalized_odds_difference"),
        }
    return result


def _prepare_scenario(opts: dict[str, Any]) -> Scenario:
    scenario = SCENARIOS[opts["scenario"]](seed=opts["seed"])
    if opts["rounds"] is not None:
        scenario.plan["training"]["rounds"] = opts["rounds"]
    if opts["sites"] is not None:
        if opts["sites"] < 2:
            raise CommandError("--sites must be at least 2")
        largest = sorted(scenario.sites, key=lambda s: -len(scenario.sites[s]))[: opts["sites"]]
        scenario.sites = {s: scenario.sites[s] for s in scenario.sites if s in largest}
    if opts["max_rows"] is not None:
        scenario.sites = {
            s: df.sample(n=min(len(df), opts["max_rows"]), random_state=opts["seed"]).reset_index(
                drop=True
            )
            for s, df in scenario.sites.items()
        }
    scenario.plan["min_silos"] = min(scenario.plan.get("min_silos", 2), len(scenario.sites))
    if opts.get("fairness_mitigation", "none") != "none":
        scenario.plan["fairness"]["mitigation"] = {"kind": opts["fairness_mitigation"]}
    if opts.get("postprocess_rows") is not None:
        if opts.get("fairness_mitigation") != "postprocess":
            raise CommandError(
                "--postprocess-rows applies to --fairness-mitigation postprocess only (it says "
                "which rows the group thresholds are chosen on)"
            )
        scenario.plan["fairness"]["mitigation"]["rows"] = opts["postprocess_rows"]
    if opts.get("fairness_epsilon") is not None:
        if not opts["fairness_epsilon"] > 0:
            raise CommandError("--fairness-epsilon must be a number > 0")
        scenario.plan["fairness"]["dp_epsilon"] = opts["fairness_epsilon"]
    if opts["strategy"]:
        scenario.plan["aggregation"] = {"strategy": opts["strategy"]}
    if opts["secagg"]:
        scenario.plan["secure_aggregation"] = True
    if opts["dp"] != "none":
        if not opts["target_epsilon"] > 0:
            raise CommandError("--target-epsilon must be a number > 0")
        scenario.plan["privacy"] = {
            "mode": opts["dp"],
            "target_epsilon": opts["target_epsilon"],
            "noise_multiplier": None,
            # sample: per-example gradient bound; client: bound on each silo's update delta
            "clip": 1.0,
            "delta": 1e-5,
        }
    return scenario


def _reset(scenario: Scenario, home: Path) -> None:
    """Remove the previous run of this demo: its consortium, blobs and site folders."""
    old = Consortium.objects.filter(name=scenario.consortium).first()
    if old is not None:
        run_ids = list(Run.objects.filter(plan__consortium=old).values_list("pk", flat=True))
        old.delete()
        for run_id in run_ids:
            blob_store().delete_prefix(f"runs/{run_id}")
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)


@dataclass
class DemoUser:
    """A demo account, printed at the end with its one-time password."""

    username: str
    role: str
    organization: str
    password: str


def _user(username: str, *, staff: bool = False) -> tuple[Any, str]:
    user, _ = get_user_model().objects.get_or_create(username=username)
    password = secrets.token_urlsafe(9)
    user.set_password(password)
    user.is_staff = user.is_superuser = staff
    user.save()
    return user, password


def _steward_keys(scenario: Scenario, home: Path) -> dict[str, Any]:
    """Each site's steward's Ed25519 key, as `quorum-agent steward-key new` writes it (0600, in
    ``stewards/`` of the demo's folder: the steward's own machine in a real consortium)."""
    folder = home / "stewards"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    keys: dict[str, Any] = {}
    for site in scenario.sites:
        key = signing.generate_private_key()
        path = folder / f"steward-{site}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signing.private_key_to_pem(key))
        keys[site] = key
    return keys


@transaction.atomic
def _create_consortium(
    scenario: Scenario, *, budget: float | None = None, steward_keys: dict[str, Any]
) -> tuple[TrainingPlan, dict[str, str], list[DemoUser], Any]:
    """Walk the governance path a real consortium takes, with one user per role.

    The operator creates the consortium and makes its admin; the admin invites each
    organisation's first admin, who accepts and grants the organisation's steward role (the admin
    never holds an approving role). Stewards register their silos, the consortium admin admits them (tokens shown once), the data
    scientist proposes the plan, every participating silo's steward approves its exact hash and
    signs the approval with their own key (``steward_keys``), which each site pins.
    """
    consortium = consortium_create(
        actor=None,
        name=scenario.consortium,
        description=scenario.title,
        require_steward_unanimity=True,
        org_quorum_mode=Consortium.QuorumMode.FRACTION,
        org_quorum_value=0.5,
    )
    office = organization_create(
        actor=None,
        consortium=consortium,
        name="Consortium office",
        kind=Organization.Kind.RESEARCH_LAB,
    )
    users: list[DemoUser] = []
    admin, password = _user("admin", staff=True)
    # The operator's bootstrap, as `manage.py grant_consortium_admin` does it (audited).
    membership_add(actor=None, user=admin, organization=office, role=Role.CONSORTIUM_ADMIN)
    users.append(DemoUser("admin", Role.CONSORTIUM_ADMIN, office.name, password))
    for username, role in (("scientist", Role.DATA_SCIENTIST), ("auditor", Role.AUDITOR)):
        user, password = _user(username)
        membership_add(actor=admin, user=user, organization=office, role=role)
        users.append(DemoUser(username, role, office.name, password))

    silos: list[Silo] = []
    tokens: dict[str, str] = {}
    for i, (site, frame) in enumerate(scenario.sites.items()):
        org = organization_create(
            actor=None,
            consortium=consortium,
            name=scenario.site_org_names[site],
            kind=scenario.org_kind,
        )
        # Separation of duties: the consortium admin only invites the organisation's first admin,
        # who accepts and then grants the steward role; the admin never holds an approving role.
        org_admin, password = _user("orgadmin" if i == 0 else f"orgadmin-{site}")
        invitation = membership_add(
            actor=admin, user=org_admin, organization=org, role=Role.ORG_ADMIN
        )
        membership_accept(actor=org_admin, membership=invitation)
        users.append(DemoUser(org_admin.username, Role.ORG_ADMIN, org.name, password))
        steward, password = _user(f"steward-{site}")
        membership_add(actor=org_admin, user=steward, organization=org, role=Role.DATA_STEWARD)
        users.append(DemoUser(steward.username, Role.DATA_STEWARD, org.name, password))
        silo = silo_register(
            actor=steward,
            organization=org,
            name=site,
            description=f"{scenario.title}: records of {org.name}",
            schema=scenario.plan["schema"],
            row_count=len(frame),
            location=f"demo/{scenario.name}/sites/{site}/data.csv",
        )
        tokens[site] = silo_admit(actor=admin, silo=silo)
        if budget is not None:
            silo = silo_set_budget(actor=admin, silo=silo, epsilon=budget, delta=1e-5)
        silos.append(silo)
    scientist = get_user_model().objects.get(username="scientist")
    try:
        plan = plan_propose(
            actor=scientist,
            consortium=consortium,
            name=scenario.plan.get("name") or f"{scenario.title} model",
            description=scenario.notes,
            spec=scenario.plan,
            silos=silos,
            submit=True,
        )
    except ValidationError as exc:  # the options make a plan the plan language refuses
        problems = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
        raise CommandError(f"the demo's plan was refused at proposal: {problems}") from None
    _approve_as_stewards(plan, steward_keys)
    plan.refresh_from_db()
    if plan.status != TrainingPlan.Status.APPROVED:
        raise CommandError(f"the demo plan is {plan.status} after every steward approved it")
    return plan, tokens, users, scientist


def _launch_agents(
    scenario: Scenario,
    home: Path,
    tokens: dict[str, str],
    ws_url: str,
    public_key: str,
    steward_keys: dict[str, str],
) -> dict[str, subprocess.Popen[bytes]]:
    """Write each site's folder (data.csv, site.toml pinning the server's key and its steward's
    key) and start its agent process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    agents: dict[str, subprocess.Popen[bytes]] = {}
    for site, frame in scenario.sites.items():
        folder = home / "sites" / site
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / "data.csv", index=False)
        (folder / "token.txt").write_text(tokens[site] + "\n")
        os.chmod(folder / "token.txt", 0o600)
        (folder / "site.toml").write_text(
            f'[server]\nurl = "{ws_url}"\ntoken_file = "token.txt"\npublic_key = "{public_key}"\n\n'
            f'[data]\npath = "data.csv"\n\n[agent]\nname = "{site}"\n\n'
            f'[governance]\nsteward_keys = ["{steward_keys[site]}"]\n'
        )
        log = open(folder / "agent.log", "wb")  # noqa: SIM115 - the child owns it until it exits
        agents[site] = subprocess.Popen(
            [sys.executable, "-m", "clientagent", "run", "--config", str(folder / "site.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
    return agents


def _wait_online(
    sites: list[str], agents: dict[str, subprocess.Popen[bytes]], *, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        online = Silo.objects.filter(name__in=sites, connection_id__isnull=False).count()
        if online == len(sites):
            return
        dead = [s for s, p in agents.items() if p.poll() is not None]
        if dead:
            raise CommandError(f"site agent(s) {', '.join(dead)} exited.\n{_log_tails(agents)}")
        time.sleep(0.2)
    raise CommandError(
        f"not every site agent connected within {timeout:.0f} s.\n{_log_tails(agents)}"
    )


def _stop_agents(agents: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in agents.values():
        if proc.poll() is None:
            proc.terminate()
    for proc in agents.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _log_tails(agents: dict[str, subprocess.Popen[bytes]], lines: int = 8) -> str:
    out = []
    for site, proc in agents.items():
        log_path = Path(proc.args[-1]).parent / "agent.log"  # type: ignore[index]
        try:
            tail = log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = []
        out.append(f"--- {site} agent (exit {proc.poll()}), {log_path}:\n" + "\n".join(tail))
    return "\n".join(out)


def _round_line(run: Run, round_: Round) -> str:
    metrics = {(m.scope, m.name): m.value for m in round_.metrics.filter(silo__isnull=True)}
    parts = [f"round {round_.number:>3}/{run.rounds}", f"{round_.updates.count()} updates"]
    for name, label in (("auc", "AUC"), ("macro_f1", "macro F1"), ("rmse", "RMSE")):
        if ("local", name) in metrics:
            parts.append(f"local {label} {metrics[('local', name)]:.4f}")
    if ("train", "train_loss") in metrics:
        parts.append(f"loss {metrics[('train', 'train_loss')]:.4f}")
    if round_.duration_seconds is not None:
        parts.append(f"{round_.duration_seconds:.2f} s")
    return "  ".join(parts)


def _round_seconds(run: Run) -> list[float]:
    """Wall time of each completed round, opening to completion."""
    return [
        round(r.duration_seconds, 3)
        for r in Round.objects.filter(run=run, status=Round.Status.COMPLETED).order_by("number")
        if r.duration_seconds is not None
    ]
