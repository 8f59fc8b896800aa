"""`sevhook status`: the attested guests of this host, their mode, their last verdict, and whether
their key broker answers now."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

EPILOG = """examples:
  sevhook status
  sevhook status web1
  sevhook status --json | jq '.domains[] | select(.last.verdict == "refused")'

Lists each domain with sevhook metadata (libvirt, read-only connection): its state, its mode (hook:
`virsh start --paused` with the libvirt hook; start: `sevhook start`), the last attestation's verdict,
step, reason and time as the hook or `sevhook start` recorded it in /var/lib/sevhook/status
($SEVHOOK_STATUS_DIR), the launch id, and whether the domain's key broker answers GET /healthz now.
exit status: 0 listed; 1 libvirt unreachable or DOMAIN has no sevhook metadata; 2 usage error."""

HEALTH_TIMEOUT = 2.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status", help="attested guests on this host: mode, last verdict and reason, broker reachable",
        description="Show each domain with sevhook metadata, how it is attested, its last attestation's "
                    "verdict and whether its key broker answers now.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain")
    parser.add_argument("-c", "--connect", metavar="URI", default=None,
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI or libvirt's default)")
    parser.add_argument("--json", action="store_true",
                        help='print {"domains": [{"name", "state", "mode", "guest", "broker", "broker_ok", '
                             '"broker_answer", "last": {...} | null}]}')
    parser.set_defaults(func=run)


def _attestation(xml: str, name: str) -> Any:
    """The domain's <sevhook:attestation>, None without one; unreadable metadata is an error text."""
    from sevhook.errors import SevhookError
    from sevhook.xml import load_domain

    try:
        document = load_domain(xml.encode(), filename=f"domain XML of {name}", decode_certificates=False)
    except SevhookError as exc:
        return exc.message
    return document.domain.attestation


def broker_health(url: str, ca_file: str | None) -> tuple[bool, str]:
    """Whether GET URL/healthz answers 200 within HEALTH_TIMEOUT, and what was seen."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=HEALTH_TIMEOUT, context=context)
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=HEALTH_TIMEOUT)
        try:
            connection.request("GET", parts.path.rstrip("/") + "/healthz")
            status = connection.getresponse().status
        finally:
            connection.close()
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError) as exc:
        return False, f"no answer ({exc.__class__.__name__}: {exc})"[:200]
    return status == 200, f"HTTP {status}"


_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off",
           6: "crashed", 7: "suspended"}


def _rows(connection: Any, only: str | None) -> list[dict[str, Any]]:
    from sevhook.status import read_verdict
    from sevhook.virt import LibvirtError, libvirt_module

    libvirt = libvirt_module()
    try:
        domains = [connection.lookupByName(only)] if only else connection.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"domain {only}: {exc.get_error_message()}; `virsh list --all` names the domains") from exc
    health: dict[tuple[str, str | None], tuple[bool, str]] = {}
    rows = []
    for domain in sorted(domains, key=lambda d: d.name()):
        name = domain.name()
        try:
            xml, state = domain.XMLDesc(0), _STATES.get(domain.state()[0], "unknown")
        except libvirt.libvirtError:
            continue  # undefined while we looked
        attestation = _attestation(xml, name)
        if attestation is None:
            continue
        row: dict[str, Any] = {"name": name, "state": state}
        if isinstance(attestation, str):
            row.update(mode=None, guest=None, broker=None, broker_ok=False, broker_answer=None,
                       error=f"metadata unreadable: {attestation}")
        else:
            key = (attestation.broker.url, attestation.broker.ca_file)
            if key not in health:
                health[key] = broker_health(*key)
            row.update(mode=attestation.mode, guest=attestation.guest_id,
                       broker=attestation.broker.url, broker_ok=health[key][0], broker_answer=health[key][1])
        try:
            verdict = read_verdict(name)
        except ValueError as exc:
            row["last"], row["record_error"] = None, str(exc)
        else:
            row["last"] = verdict.to_json() if verdict else None
        rows.append(row)
    if only and not rows:
        raise LibvirtError(f"domain {only} has no sevhook metadata (<sevhook:attestation>); "
                           "`sevhook prepare-domain` adds it")
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    """One line per domain that fits 100 columns, the reason and problems indented below."""
    if not rows:
        print("no domain with sevhook metadata on this host")
        return
    for row in rows:
        last = row.get("last")
        if last:
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(last["at"]))
            verdict = f"{last['verdict']} {when}" + (f" at {last['step']}" if last["step"] else "")
        else:
            verdict = "never attested here"
        broker = "broker ok" if row["broker_ok"] else "broker DOWN"
        print(f"{row['name']}  {row['state']}  mode {row['mode'] or '?'}  {verdict}  {broker}")
        details = [f"guest {row['guest']} at {row['broker']} ({row['broker_answer']})"] if row["broker"] else []
        if last and last["launch_id"]:
            details.append(f"launch {last['launch_id']}")
        if last and last["reason"]:
            details.append(f"reason: {last['reason']}")
        details += [row[key] for key in ("error", "record_error") if row.get(key)]
        for detail in details:
            print(f"    {detail}")


def run(args: argparse.Namespace) -> int:
    from sevhook.virt import open_connection

    connection = open_connection(args.connect, readonly=True)
    try:
        rows = _rows(connection, args.domain)
    finally:
        connection.close()
    if args.json:
        print(json.dumps({"domains": rows}, indent=2))
    else:
        _print(rows)
    sys.stdout.flush()
    return 0
