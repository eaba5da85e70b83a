"""HTTP face of the emulator: the Alibaba Cloud VPC and ECS RPC actions at `/` and unsigned admin endpoints.

One endpoint serves both APIs, dispatched by Action: the VPC actions (`ACTIONS`) and ECS's DescribeInstances
take any Version; the ECS network-interface actions (`ecs_actions.ECS_ACTIONS`) only ECS's 2014-05-26.

RPC requests (GET query or POST form, both accepted) carry the common parameters and are verified with
the shared signer; answers are JSON in Alibaba's shapes, errors `{"RequestId", "HostId", "Code",
"Message"}` with a 4xx/5xx status. Admin endpoints under `/_emulator/` take and return plain JSON and are
meant for the CLI, the lab and tests (the emulator listens on 127.0.0.1 by default).
"""
from __future__ import annotations

import json
import logging
import time
import uuid

from flask import Flask, Response, request

from vpcnet_lab.emulator.ecs_actions import (
    ECS_ACTIONS,
    ECS_VERSION,
    create_vswitch_cidr_reservation,
    list_vswitch_cidr_reservations,
)
from vpcnet_lab.emulator.errors import ApiError
from vpcnet_lab.emulator.state import Emulator

log = logging.getLogger(__name__)

HOST_ID = "vpc.emulator.vpcnet"


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _json(data: dict, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _error(exc: ApiError, request_id: str) -> Response:
    return _json({"RequestId": request_id, "HostId": HOST_ID, "Code": exc.code, "Message": exc.message},
                 exc.status)


def _int_param(params: dict, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(f"InvalidParameter.{name}", f"The specified {name} {raw!r} is not an integer.") from None
    if not low <= value <= high:
        raise ApiError(f"InvalidParameter.{name}", f"The specified {name} must be between {low} and {high}.")
    return value


# ---------------------------------------------------------------------- actions

def _create_route_entry(emu: Emulator, p: dict) -> dict:
    for name in ("RouteTableId", "DestinationCidrBlock"):
        if not p.get(name):
            raise ApiError("MissingParameter", f"The input parameter {name} that is mandatory for "
                           "processing this request is not supplied.")
    entry_id = emu.create_route_entry(
        p["RouteTableId"], p["DestinationCidrBlock"], p.get("NextHopType", "Instance"),
        p.get("NextHopId", ""), name=p.get("RouteEntryName", ""), description=p.get("Description", ""),
        client_token=p.get("ClientToken", ""))
    return {"RouteEntryId": entry_id}


def _delete_route_entry(emu: Emulator, p: dict) -> dict:
    emu.delete_route_entry(p.get("RouteTableId", ""), p.get("RouteEntryId", ""),
                           p.get("DestinationCidrBlock", ""), p.get("NextHopId", ""))
    return {}


def _indexed(p: dict, prefix: str) -> list[dict]:
    """`Prefix.1.Field=...`, `Prefix.2.Field=...` -> [{Field: ...}, ...] in index order (RPC lists)."""
    items: dict[int, dict] = {}
    for key, value in p.items():
        if not key.startswith(prefix + "."):
            continue
        index, _, name = key[len(prefix) + 1:].partition(".")
        if not index.isdigit() or not name:
            raise ApiError("InvalidParameter", f"The parameter {key} is malformed.")
        items.setdefault(int(index), {})[name] = value
    return [items[i] for i in sorted(items)]


def _create_route_entries(emu: Emulator, p: dict) -> dict:
    entries = _indexed(p, "RouteEntries")
    for e in entries:       # Alibaba spells the field `Describption` in this call
        if "Describption" in e:
            e.setdefault("Description", e.pop("Describption"))
    ids, failed = emu.create_route_entries(entries, client_token=p.get("ClientToken", ""))
    return {"SuccessCount": len(ids), "FailedCount": len(failed), "RouteEntryIds": ids,
            "FailedRouteEntries": failed}


def _delete_route_entries(emu: Emulator, p: dict) -> dict:
    done, failed = emu.delete_route_entries(_indexed(p, "RouteEntries"))
    return {"SuccessCount": len(done), "FailedCount": len(failed), "FailedRouteEntries": failed}


def _describe_route_entry_list(emu: Emulator, p: dict) -> dict:
    max_result = _int_param(p, "MaxResult", 100, 1, 100)
    filters = {k: p.get(k, "") for k in ("RouteEntryId", "RouteEntryName", "DestinationCidrBlock",
                                          "RouteEntryType", "NextHopId", "NextHopType", "IpVersion")}
    entries, token = emu.describe_route_entries(p.get("RouteTableId", ""), filters, max_result,
                                                p.get("NextToken", ""))
    return {"RouteEntrys": {"RouteEntry": entries}, "NextToken": token}


def _describe_route_table_list(emu: Emulator, p: dict) -> dict:
    page = _int_param(p, "PageNumber", 1, 1, 1_000_000)
    size = _int_param(p, "PageSize", 10, 1, 50)
    tables = emu.describe_route_tables(p.get("VpcId", ""), p.get("RouteTableId", ""), p.get("VSwitchId", ""))
    return {"TotalCount": len(tables), "PageNumber": page, "PageSize": size,
            "RouterTableList": {"RouterTableListType": tables[(page - 1) * size: page * size]}}


def _describe_vswitches(emu: Emulator, p: dict) -> dict:
    page = _int_param(p, "PageNumber", 1, 1, 1_000_000)
    size = _int_param(p, "PageSize", 10, 1, 50)
    vswitches = emu.describe_vswitches(p.get("VpcId", ""))
    return {"TotalCount": len(vswitches), "PageNumber": page, "PageSize": size,
            "VSwitches": {"VSwitch": vswitches[(page - 1) * size: page * size]}}


def _describe_instances(emu: Emulator, p: dict) -> dict:
    page = _int_param(p, "PageNumber", 1, 1, 1_000_000)
    size = _int_param(p, "PageSize", 10, 1, 100)
    ids = None
    if p.get("InstanceIds"):
        try:
            ids = json.loads(p["InstanceIds"])
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise ValueError
        except ValueError:
            raise ApiError("InvalidInstanceIds.Malformed", "InstanceIds must be a JSON list of strings.") from None
        if len(ids) > 100:
            raise ApiError("InvalidInstanceIds.ValueNotSupported", "At most 100 InstanceIds per request.")
    instances = [{**i, "InstanceType": emu.enis.instance_type(i["InstanceId"])} for i in emu.describe_instances(ids)]
    return {"TotalCount": len(instances), "PageNumber": page, "PageSize": size,
            "Instances": {"Instance": instances[(page - 1) * size: page * size]}}


ACTIONS = {
    "CreateRouteEntry": _create_route_entry,
    "DeleteRouteEntry": _delete_route_entry,
    "CreateRouteEntries": _create_route_entries,
    "DeleteRouteEntries": _delete_route_entries,
    "DescribeRouteEntryList": _describe_route_entry_list,
    "DescribeRouteTableList": _describe_route_table_list,
    "DescribeVSwitches": _describe_vswitches,
    "DescribeInstances": _describe_instances,
    "ListVSwitchCidrReservations": list_vswitch_cidr_reservations,
    "CreateVSwitchCidrReservation": create_vswitch_cidr_reservation,
}


# ---------------------------------------------------------------------- app

def create_app(emulator: Emulator) -> Flask:
    app = Flask("vpcnet_lab.emulator")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20

    @app.route("/", methods=["GET", "POST"])
    def rpc():
        request_id = _request_id()
        params: dict[str, str] = {}
        for key, value in request.args.items():
            params[key] = value
        if request.method == "POST":
            for key, value in request.form.items():
                params.setdefault(key, value)
        action = params.get("Action", "")
        try:
            if not action:
                raise ApiError("MissingParameter", "The input parameter Action that is mandatory for "
                               "processing this request is not supplied.")
            emulator.count_request(action)
            latency = emulator.latency
            if latency > 0:
                time.sleep(latency)
            emulator.authenticate(request.method, params)
            ecs = ECS_ACTIONS.get(action) if params.get("Version") == ECS_VERSION else None
            handler = ecs or ACTIONS.get(action)
            if action == "DescribeVSwitches" and not emulator.vswitch_api:
                handler = None
            if action in ("CreateRouteEntries", "DeleteRouteEntries") and not emulator.batch_api:
                handler = None
            if handler is None:
                raise ApiError("InvalidAction.NotFound", f"Specified api {action} is not found "
                               "in this Version (the emulator implements " + ", ".join(ACTIONS) + ", and "
                               f"with Version {ECS_VERSION} " + ", ".join(ECS_ACTIONS) + ").", 404)
            fault = emulator.draw_fault()
            if fault is not None:
                raise fault
            body = handler(emulator, params)
        except ApiError as exc:
            return _error(exc, request_id)
        except Exception:
            log.exception("emulator: %s failed", action or "request")
            return _error(ApiError("InternalError", "The request processing has failed due to some unknown "
                                   "error.", 500), request_id)
        return _json({"RequestId": request_id, **body})

    # ------------------------------------------------------------------ admin

    def _body() -> dict:
        data = request.get_json(force=True, silent=True)
        return data if isinstance(data, dict) else {}

    def _bad(message: str, status: int = 400) -> Response:
        return _json({"error": message}, status)

    @app.get("/_emulator/state")
    def admin_state():
        return _json(emulator.snapshot())

    @app.post("/_emulator/faults")
    def admin_faults():
        data = _body()
        current = emulator.faults()
        try:
            faults = emulator.set_faults(rate=data.get("rate", current["rate"]),
                                         codes=data.get("codes", current["codes"]),
                                         latency=data.get("latency", current["latency"]),
                                         seed=data.get("seed"))
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json(faults)

    @app.post("/_emulator/instances")
    def admin_add_instance():
        data = _body()
        instance_id, ip, ip6 = data.get("instance_id"), data.get("ip"), data.get("ip6", "")
        kind = data.get("instance_type", "")
        if (not isinstance(instance_id, str) or not instance_id or not isinstance(ip, str)
                or not isinstance(ip6, str) or not isinstance(kind, str)):
            return _bad("need {\"instance_id\": str, \"ip\": str} (and optionally \"ip6\": str, "
                        "\"instance_type\": str)")
        try:
            emulator.register_instance(instance_id, ip, ip6, kind)
        except ValueError as exc:
            return _bad(str(exc))
        return _json({"instance_id": instance_id, "ip": ip, "ip6": ip6,
                      "network_interface_id": emulator.network_interface_id(instance_id),
                      "instance_type": emulator.enis.instance_type(instance_id)})

    @app.delete("/_emulator/instances/<instance_id>")
    def admin_delete_instance(instance_id):
        if not emulator.deregister_instance(instance_id):
            return _bad(f"no instance {instance_id}", 404)
        return _json({"deleted": instance_id})

    @app.post("/_emulator/config")
    def admin_config():
        data = _body()
        try:
            config = emulator.configure(pending_delay=data.get("pending_delay"),
                                        pending_delay_max=data.get("pending_delay_max"),
                                        deleting_delay=data.get("deleting_delay"),
                                        quota=data.get("quota"),
                                        write_interval=data.get("write_interval"))
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json(config)

    @app.post("/_emulator/route-tables")
    def admin_add_table():
        data = _body()
        table_id = data.get("route_table_id")
        if not isinstance(table_id, str) or not table_id:
            return _bad("need {\"route_table_id\": str, \"vpc_id\": str (optional)}")
        vswitches = data.get("vswitches") or {}
        if not isinstance(vswitches, dict):
            return _bad("vswitches must be {vSwitch id: CIDR}")
        try:
            emulator.add_route_table(table_id, data.get("vpc_id"), quota=data.get("quota"), vswitches=vswitches)
        except ApiError as exc:
            return _bad(f"{exc.code}: {exc.message}", exc.status)
        except (TypeError, ValueError) as exc:
            return _bad(str(exc), 409)
        return _json({"route_table_id": table_id})

    @app.post("/_emulator/route-tables/<table_id>")
    def admin_table_quota(table_id):
        """{"quota": N or null}: this table's custom-entry quota."""
        data = _body()
        try:
            emulator.set_table_quota(table_id, data.get("quota"))
        except ApiError as exc:
            return _bad(f"{exc.code}: {exc.message}", exc.status)
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json({"route_table_id": table_id, "quota": emulator.table_quota(table_id)})

    @app.post("/_emulator/vswitches")
    def admin_add_vswitch():
        """{"vswitch_id", "cidr", "route_table_id" (default: the system table), "zone_id"}."""
        data = _body()
        vsw, cidr = data.get("vswitch_id"), data.get("cidr")
        if not isinstance(vsw, str) or not vsw or not isinstance(cidr, str):
            return _bad("need {\"vswitch_id\": str, \"cidr\": str, \"route_table_id\": str (optional)}")
        try:
            emulator.add_vswitch(vsw, cidr, data.get("route_table_id"), data.get("zone_id", ""))
        except ApiError as exc:
            return _bad(f"{exc.code}: {exc.message}", exc.status)
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json({"vswitch_id": vsw, "cidr": cidr})

    @app.post("/_emulator/cidr-reservations")
    def admin_add_reservation():
        """{"vswitch_id", "cidr", "type": "Prefix" (default)}: a vSwitch reserved CIDR block."""
        data = _body()
        vsw, cidr, kind = data.get("vswitch_id"), data.get("cidr"), data.get("type", "Prefix")
        if not isinstance(vsw, str) or not vsw or not isinstance(cidr, str) or not isinstance(kind, str):
            return _bad("need {\"vswitch_id\": str, \"cidr\": str, \"type\": \"Prefix\" (optional)}")
        try:
            reservation_id = emulator.add_cidr_reservation(vsw, cidr, kind)
        except ApiError as exc:
            return _bad(f"{exc.code}: {exc.message}", exc.status)
        except ValueError as exc:
            return _bad(str(exc))
        return _json({"VSwitchCidrReservationId": reservation_id})

    @app.post("/_emulator/vswitch-ipv6")
    def admin_vswitch_ipv6():
        """{"vswitch_id", "cidr"}: the vSwitch's IPv6 CIDR, where IPv6 /80 prefixes come from."""
        data = _body()
        vsw, cidr = data.get("vswitch_id"), data.get("cidr")
        if not isinstance(vsw, str) or not vsw or not isinstance(cidr, str):
            return _bad("need {\"vswitch_id\": str, \"cidr\": str}")
        try:
            emulator.set_vswitch_ipv6(vsw, cidr)
        except ValueError as exc:
            return _bad(str(exc))
        return _json({"vswitch_id": vsw, "ipv6_cidr": cidr})

    @app.post("/_emulator/network-interfaces/<eni_id>/hold")
    def admin_hold_interface(eni_id):
        """{"seconds": N}: writes to the interface answer Operation.Conflict meanwhile."""
        seconds = _body().get("seconds", 0)
        if not isinstance(seconds, (int, float)) or not 0 <= seconds <= 600:
            return _bad("need {\"seconds\": number between 0 and 600}")
        emulator.hold_interface(eni_id, seconds)
        return _json({"network_interface_id": eni_id, "seconds": seconds})

    @app.post("/_emulator/entries")
    def admin_add_entry():
        """A hand-made entry (as from the console): {destination, next_hop_id, name, description,
        route_table_id, type: Custom|System, next_hop_type, status}."""
        data = _body()
        dest = data.get("destination")
        if not isinstance(dest, str):
            return _bad("need {\"destination\": cidr, ...}")
        try:
            if data.get("type", "Custom") == "System":
                entry_id = emulator.add_system_entry(dest, data.get("next_hop_type", "local"),
                                                     data.get("next_hop_id", ""), data.get("route_table_id"))
            else:
                entry_id = emulator.add_custom_entry(
                    dest, data.get("next_hop_id", ""), name=data.get("name", ""),
                    description=data.get("description", ""), route_table_id=data.get("route_table_id"),
                    next_hop_type=data.get("next_hop_type", "Instance"), status=data.get("status", "Available"))
        except ApiError as exc:
            return _bad(f"{exc.code}: {exc.message}", exc.status)
        except (TypeError, ValueError) as exc:
            return _bad(str(exc))
        return _json({"RouteEntryId": entry_id})

    @app.delete("/_emulator/entries/<entry_id>")
    def admin_delete_entry(entry_id):
        """Remove an entry at once, whatever its status (a change behind the plugin's back)."""
        if not emulator.remove_entry(entry_id):
            return _bad(f"no entry {entry_id}", 404)
        return _json({"deleted": entry_id})

    @app.errorhandler(404)
    def not_found(_exc):
        return _bad("not found", 404)

    @app.errorhandler(405)
    def not_allowed(_exc):
        return _bad("method not allowed", 405)

    @app.errorhandler(413)
    def too_large(_exc):
        return _bad("request too large", 413)

    return app
