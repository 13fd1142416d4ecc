"""Defaulting and validation of objects (pure): used by the API server and by `netplane apply`.

    obj = default(obj)            # a defaulted copy: Service type ClusterIP, protocol TCP, ...
    errors = validate(obj)        # [(field path, message)], empty when valid
    errors += validate_update(old, obj)   # immutable fields, on update

Messages follow the Kubernetes wording so a user who knows `kubectl` recognises them:
`spec.ports: Required value`, `spec.ports[0].port: Invalid value: 70000: must be between 1
and 65535, inclusive`.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import re
from typing import Callable

FieldError = tuple[str, str]  # (field path, message)

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(_LABEL)
DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
WILDCARD_SUBDOMAIN = re.compile(rf"\*\.{_LABEL}(\.{_LABEL})*")
IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")

PROTOCOLS = ("TCP", "UDP", "SCTP")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PATH_TYPES = ("Exact", "Prefix", "ImplementationSpecific")
RESTART_POLICIES = ("Always", "OnFailure", "Never")
DNS_POLICIES = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
ADDRESS_TYPES = ("IPv4", "IPv6", "FQDN")


# --- messages (Kubernetes wording) ------------------------------------------------------------

def required() -> str:
    return "Required value"


def invalid(value, why: str) -> str:
    return f"Invalid value: {_show(value)}: {why}"


def unsupported(value, supported) -> str:
    return f"Unsupported value: {_show(value)}: supported values: " + ", ".join(f'"{s}"' for s in supported)


def duplicate(value) -> str:
    return f"Duplicate value: {_show(value)}"


def _show(value) -> str:
    """A value as Kubernetes shows it: strings quoted, numbers bare, structures as JSON."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def format_error(error: FieldError) -> str:
    return f"{error[0]}: {error[1]}"


def format_errors(errors: list[FieldError]) -> str:
    return "; ".join(format_error(e) for e in errors)


# --- defaulting -------------------------------------------------------------------------------

def default(obj: dict) -> dict:
    """A defaulted deep copy of `obj` (idempotent: default(default(x)) == default(x))."""
    obj = copy.deepcopy(obj)
    kind = obj.get("kind", "")
    fill = _DEFAULTERS.get(kind)
    spec = obj.get("spec")
    if fill and isinstance(spec, dict):
        fill(spec)
    if kind == "EndpointSlice":  # its fields sit at the top level, not under spec
        for port in _dicts(obj.get("ports")):
            port.setdefault("protocol", "TCP")
    if kind == "Endpoints":
        for subset in _dicts(obj.get("subsets")):
            for port in _dicts(subset.get("ports")):
                port.setdefault("protocol", "TCP")
    return obj


def _default_service(spec: dict) -> None:
    spec.setdefault("type", "ClusterIP")
    if spec["type"] != "ExternalName":
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    for port in _dicts(spec.get("ports")):
        port.setdefault("protocol", "TCP")
        if "targetPort" not in port and "port" in port:
            port["targetPort"] = port["port"]


def _default_pod_spec(spec: dict) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    for container in _dicts(spec.get("containers")):
        for port in _dicts(container.get("ports")):
            port.setdefault("protocol", "TCP")


def _default_template(spec: dict) -> None:
    template = spec.get("template")
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        _default_pod_spec(template["spec"])


def _default_replicaset(spec: dict) -> None:
    spec.setdefault("replicas", 1)
    _default_template(spec)


def _default_deployment(spec: dict) -> None:
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    _default_strategy(spec, "strategy", {"maxSurge": "25%", "maxUnavailable": "25%"})
    _default_template(spec)


def _default_strategy(spec: dict, field: str, rolling: dict) -> None:
    """spec.<field>: RollingUpdate unless said otherwise, with the kind's rollingUpdate defaults."""
    strategy = spec.setdefault(field, {})
    if isinstance(strategy, dict):
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            given = strategy.setdefault("rollingUpdate", {})
            if isinstance(given, dict):
                for key, value in rolling.items():
                    given.setdefault(key, value)


def _default_daemonset(spec: dict) -> None:
    spec.setdefault("revisionHistoryLimit", 10)
    _default_strategy(spec, "updateStrategy", {"maxUnavailable": 1, "maxSurge": 0})
    _default_template(spec)


JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
JOB_RESTART_POLICIES = ("OnFailure", "Never")


def job_selector_defaulted(obj: dict, uid: str) -> dict:
    """A new Job's selector and template labels, as the API server generates them (unless
    spec.manualSelector): its uid, so a Job made again under the same name never adopts old pods."""
    obj = copy.deepcopy(obj)
    spec = obj.get("spec")
    if not isinstance(spec, dict) or spec.get("manualSelector"):
        return obj
    name = (obj.get("metadata") or {}).get("name", "")
    labels = {JOB_UID_LABEL: uid, JOB_NAME_LABEL: name, "controller-uid": uid, "job-name": name}
    spec["selector"] = {"matchLabels": {JOB_UID_LABEL: uid}}
    template = spec.get("template")
    if isinstance(template, dict):
        metadata = template.setdefault("metadata", {})
        if isinstance(metadata, dict):
            metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
    return obj


def _default_cronjob(spec: dict) -> None:
    spec.setdefault("concurrencyPolicy", "Allow")
    spec.setdefault("suspend", False)
    spec.setdefault("successfulJobsHistoryLimit", 3)
    spec.setdefault("failedJobsHistoryLimit", 1)
    template = spec.get("jobTemplate")
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        _default_job(template["spec"])


def _default_statefulset(spec: dict) -> None:
    spec.setdefault("replicas", 1)
    spec.setdefault("podManagementPolicy", "OrderedReady")
    spec.setdefault("revisionHistoryLimit", 10)
    _default_strategy(spec, "updateStrategy", {"partition": 0})
    _default_template(spec)


def _default_job(spec: dict) -> None:
    spec.setdefault("parallelism", 1)
    if "completions" not in spec and spec["parallelism"] == 1:
        spec["completions"] = 1   # both unset: one pod, once (only parallelism set: a work queue)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    _default_template(spec)


_DEFAULTERS: dict[str, Callable[[dict], None]] = {
    "Service": _default_service,
    "Pod": _default_pod_spec,
    "Deployment": _default_deployment,
    "ReplicaSet": _default_replicaset,
    "DaemonSet": _default_daemonset,
    "Job": _default_job,
    "StatefulSet": _default_statefulset,
    "CronJob": _default_cronjob,
}


def _dicts(value) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


# --- validation -------------------------------------------------------------------------------

def validate(obj: dict) -> list[FieldError]:
    """Every problem with `obj` (best called on default(obj)), as (field path, message)."""
    kind = obj.get("kind", "")
    errors = _validate_metadata(obj)
    check = _VALIDATORS.get(kind)
    if check:
        check(obj, errors)
    return errors


def _validate_metadata(obj: dict) -> list[FieldError]:
    errors: list[FieldError] = []
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [("metadata", required())]
    name = meta.get("name")
    if not name:
        if not meta.get("generateName"):
            errors.append(("metadata.name", required()))
    else:
        errors += _check_name(obj.get("kind", ""), name)
    namespace = meta.get("namespace")
    if namespace and not _matches(DNS1123_LABEL, namespace, 63):
        errors.append(("metadata.namespace", invalid(namespace, _label_message())))
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and not isinstance(value, dict):
            errors.append((f"metadata.{field}", invalid(value, "must be a map of string to string")))
    errors += _check_labels(meta.get("labels"), "metadata.labels")
    for key, value in (meta.get("annotations") or {}).items() if isinstance(meta.get("annotations"), dict) else ():
        if not isinstance(value, str):
            errors.append((f"metadata.annotations[{key}]", invalid(value, "must be a string")))
    return errors


def _check_name(kind: str, name) -> list[FieldError]:
    if not isinstance(name, str):
        return [("metadata.name", invalid(name, "must be a string"))]
    if kind == "Service":
        if not _matches(DNS1035_LABEL, name, 63):
            return [("metadata.name", invalid(name, "a DNS-1035 label must consist of lower case alphanumeric "
                     "characters or '-', start with an alphabetic character, and end with an alphanumeric "
                     "character (e.g. 'my-name', or 'abc-123')"))]
    elif kind == "Namespace":
        if not _matches(DNS1123_LABEL, name, 63):
            return [("metadata.name", invalid(name, _label_message()))]
    elif not _matches(DNS1123_SUBDOMAIN, name, 253):
        return [("metadata.name", invalid(name, "a lowercase RFC 1123 subdomain must consist of lower case "
                 "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                 "character (e.g. 'example.com')"))]
    return []


def _label_message() -> str:
    return ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
            "must start and end with an alphanumeric character (e.g. 'my-name', or '123-abc')")


def _matches(pattern: re.Pattern, value, max_len: int) -> bool:
    return isinstance(value, str) and len(value) <= max_len and pattern.fullmatch(value) is not None


def _check_labels(labels, path: str) -> list[FieldError]:
    if not isinstance(labels, dict):
        return []
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/") if isinstance(key, str) else ("", "", key)
        if not _matches(QUALIFIED_NAME, name, 63) or (prefix and not _matches(DNS1123_SUBDOMAIN, prefix, 253)):
            errors.append((path, invalid(key, "name part must consist of alphanumeric characters, '-', '_' "
                           "or '.', and must start and end with an alphanumeric character")))
        if not _matches(LABEL_VALUE, value, 63):
            errors.append((f"{path}[{key}]" if isinstance(key, str) else path,
                           invalid(value, "a valid label must be an empty string or consist of alphanumeric "
                                   "characters, '-', '_' or '.', and must start and end with an "
                                   "alphanumeric character (at most 63 characters)")))
    return errors


def _port_number(value, path: str, errors: list, allow_zero: bool = False) -> bool:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        errors.append((path, invalid(value, f"must be between {low} and 65535, inclusive")))
        return False
    return True


def _spec(obj: dict, errors: list) -> dict | None:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        errors.append(("spec", required() if spec is None else invalid(spec, "must be an object")))
        return None
    return spec


def _list(value, path: str, errors: list, need: bool = True, of_objects: bool = True) -> list:
    if value is None or value == []:
        if need:
            errors.append((path, required()))
        return []
    if not isinstance(value, list):
        errors.append((path, invalid(value, "must be a list")))
        return []
    for index, item in enumerate(value):
        if of_objects and not isinstance(item, dict):
            errors.append((f"{path}[{index}]", invalid(item, "must be an object")))
    return value


# Service -------------------------------------------------------------------------------------

def _validate_service(obj: dict, errors: list) -> None:
    spec = _spec(obj, errors)
    if spec is None:
        return
    svc_type = spec.get("type", "ClusterIP")
    if svc_type not in SERVICE_TYPES:
        errors.append(("spec.type", unsupported(svc_type, SERVICE_TYPES)))
    headless = spec.get("clusterIP") == "None"
    ports = _list(spec.get("ports"), "spec.ports", errors, need=not headless and svc_type != "ExternalName")
    _validate_service_ports(ports, errors)
    if svc_type == "ExternalName":
        external = spec.get("externalName")
        if not external:
            errors.append(("spec.externalName", required()))
        elif not _matches(DNS1123_SUBDOMAIN, str(external).rstrip("."), 253):
            errors.append(("spec.externalName", invalid(external, "must be a DNS name (RFC 1123 subdomain)")))
    cluster_ip = spec.get("clusterIP")
    if cluster_ip not in (None, "", "None") and not _is_ip(cluster_ip):
        errors.append(("spec.clusterIP", invalid(cluster_ip, "must be empty, 'None', or a valid IP address")))
    if spec.get("sessionAffinity", "None") not in ("None", "ClientIP"):
        errors.append(("spec.sessionAffinity", unsupported(spec["sessionAffinity"], ("ClientIP", "None"))))
    for policy in ("externalTrafficPolicy", "internalTrafficPolicy"):
        if spec.get(policy, "Cluster") not in ("Cluster", "Local"):
            errors.append((f"spec.{policy}", unsupported(spec[policy], ("Cluster", "Local"))))
    selector = spec.get("selector")
    if selector is not None:
        if not isinstance(selector, dict):
            errors.append(("spec.selector", invalid(selector, "must be a map of string to string")))
        else:
            errors += _check_labels(selector, "spec.selector")


def _validate_service_ports(ports: list, errors: list) -> None:
    names, keys = set(), set()
    for index, port in enumerate(ports):
        if not isinstance(port, dict):
            continue
        path = f"spec.ports[{index}]"
        name = port.get("name")
        if not name:
            if len(ports) > 1:
                errors.append((f"{path}.name", required()))
        elif not _matches(DNS1123_LABEL, name, 63):
            errors.append((f"{path}.name", invalid(name, _label_message())))
        elif name in names:
            errors.append((f"{path}.name", duplicate(name)))
        names.add(name)
        if "port" not in port:
            errors.append((f"{path}.port", required()))
        else:
            _port_number(port["port"], f"{path}.port", errors)
        protocol = port.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            errors.append((f"{path}.protocol", unsupported(protocol, PROTOCOLS)))
        key = (port.get("port"), protocol)
        if key in keys:
            errors.append((path, duplicate(f"{key[0]}/{protocol}")))
        keys.add(key)
        if "targetPort" in port:
            _check_target_port(port["targetPort"], f"{path}.targetPort", errors)
        if port.get("nodePort") not in (None, 0):
            _port_number(port["nodePort"], f"{path}.nodePort", errors)


def _check_target_port(value, path: str, errors: list) -> None:
    if isinstance(value, str) and not value.isdigit():
        if not IANA_SVC_NAME.fullmatch(value) or "--" in value or not re.search("[a-z]", value):
            errors.append((path, invalid(value, "must contain only lowercase alphanumeric characters or '-', "
                           "at most 15 characters, at least one letter, and no leading, trailing or "
                           "double '-' (an IANA service name)")))
        return
    number = int(value) if isinstance(value, str) else value
    _port_number(number, path, errors)


def _is_ip(value) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except (ValueError, TypeError):
        return False


# Pods and their templates ---------------------------------------------------------------------

def _validate_pod(obj: dict, errors: list) -> None:
    spec = _spec(obj, errors)
    if spec is not None:
        _validate_pod_spec(spec, "spec", errors)


def _validate_pod_spec(spec: dict, path: str, errors: list) -> None:
    containers = _list(spec.get("containers"), f"{path}.containers", errors)
    names = set()
    for index, container in enumerate(containers):
        if isinstance(container, dict):
            _validate_container(container, f"{path}.containers[{index}]", names, errors)
    for index, container in enumerate(_list(spec.get("ephemeralContainers"), f"{path}.ephemeralContainers", errors,
                                            need=False)):
        if isinstance(container, dict):
            where = f"{path}.ephemeralContainers[{index}]"
            _validate_container(container, where, names, errors)
            for field in EPHEMERAL_FORBIDDEN:   # kubectl debug's containers join a running pod: no ports, no probes
                if container.get(field):
                    errors.append((f"{where}.{field}", "Forbidden: cannot be set for an Ephemeral Container"))
    policy = spec.get("restartPolicy", "Always")
    if policy not in RESTART_POLICIES:
        errors.append((f"{path}.restartPolicy", unsupported(policy, RESTART_POLICIES)))
    _validate_dns(spec, path, errors)


EPHEMERAL_FORBIDDEN = ("ports", "livenessProbe", "readinessProbe", "startupProbe", "lifecycle")


def _validate_dns(spec: dict, path: str, errors: list) -> None:
    """spec.dnsPolicy and spec.dnsConfig, as Kubernetes checks them (validateDNSPolicy/Config)."""
    policy = spec.get("dnsPolicy", "ClusterFirst")
    if policy not in DNS_POLICIES:
        errors.append((f"{path}.dnsPolicy", unsupported(policy, DNS_POLICIES)))
    config = spec.get("dnsConfig")
    if config is None:
        if policy == "None":
            errors.append((f"{path}.dnsConfig", "Required value: must provide `dnsConfig` when `dnsPolicy` is None"))
        return
    if not isinstance(config, dict):
        errors.append((f"{path}.dnsConfig", invalid(config, "must be an object")))
        return
    nameservers = _list(config.get("nameservers"), f"{path}.dnsConfig.nameservers", errors, need=False, of_objects=False)
    if policy == "None" and not nameservers:
        errors.append((f"{path}.dnsConfig.nameservers", "Required value: must provide at least one DNS nameserver "
                                                         "when `dnsPolicy` is None"))
    if len(nameservers) > 3:
        errors.append((f"{path}.dnsConfig.nameservers", invalid(nameservers, "must not have more than 3 nameservers")))
    for index, ip in enumerate(nameservers):
        if not _is_ip(ip):
            errors.append((f"{path}.dnsConfig.nameservers[{index}]", invalid(ip, "must be a valid IP address")))
    searches = _list(config.get("searches"), f"{path}.dnsConfig.searches", errors, need=False, of_objects=False)
    if len(searches) > 32:
        errors.append((f"{path}.dnsConfig.searches", invalid(len(searches), "must not have more than 32 search paths")))
    for index, domain in enumerate(searches):
        if not isinstance(domain, str) or not _matches(DNS1123_SUBDOMAIN, domain.rstrip("."), 253):
            errors.append((f"{path}.dnsConfig.searches[{index}]", invalid(domain, "must be a DNS subdomain")))
    for index, option in enumerate(_list(config.get("options"), f"{path}.dnsConfig.options", errors, need=False)):
        if isinstance(option, dict) and not option.get("name"):
            errors.append((f"{path}.dnsConfig.options[{index}].name", "Required value: must not be empty"))


def _validate_container(container: dict, path: str, names: set, errors: list) -> None:
    name = container.get("name")
    if not name:
        errors.append((f"{path}.name", required()))
    elif not _matches(DNS1123_LABEL, name, 63):
        errors.append((f"{path}.name", invalid(name, _label_message())))
    elif name in names:
        errors.append((f"{path}.name", duplicate(name)))
    names.add(name)
    if not container.get("image"):
        errors.append((f"{path}.image", required()))
    for index, port in enumerate(_list(container.get("ports"), f"{path}.ports", errors, need=False)):
        if not isinstance(port, dict):
            continue
        if "containerPort" not in port:
            errors.append((f"{path}.ports[{index}].containerPort", required()))
        else:
            _port_number(port["containerPort"], f"{path}.ports[{index}].containerPort", errors)
        if port.get("protocol", "TCP") not in PROTOCOLS:
            errors.append((f"{path}.ports[{index}].protocol", unsupported(port["protocol"], PROTOCOLS)))
    for index, env in enumerate(_list(container.get("env"), f"{path}.env", errors, need=False)):
        if isinstance(env, dict) and not env.get("name"):
            errors.append((f"{path}.env[{index}].name", required()))
    for field in ("command", "args"):
        value = container.get(field)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            errors.append((f"{path}.{field}", invalid(value, "must be a list of strings")))


def _validate_job(obj: dict, errors: list) -> None:
    """A Job: the workload's checks, counts >= 0, a template that stops (restartPolicy OnFailure or Never)."""
    _validate_workload(obj, errors, JOB_RESTART_POLICIES)
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    for field in ("parallelism", "completions", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        value = spec.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            errors.append((f"spec.{field}", invalid(value, "must be greater than or equal to 0")))
    if spec.get("completionMode", "NonIndexed") != "NonIndexed":
        errors.append(("spec.completionMode", unsupported(spec.get("completionMode"), ("NonIndexed",))))


CONCURRENCY_POLICIES = ("Allow", "Forbid", "Replace")


def _validate_cronjob(obj: dict, errors: list) -> None:
    """A CronJob: a schedule that parses, a known time zone, and a Job template a Job would accept."""
    from netplane import cron
    spec = _spec(obj, errors)
    if spec is None:
        return
    schedule = spec.get("schedule")
    if not isinstance(schedule, str) or not schedule.strip():
        errors.append(("spec.schedule", required()))
    else:
        try:
            cron.parse(schedule)
        except cron.ScheduleError as err:
            errors.append(("spec.schedule", invalid(schedule, str(err))))
    try:
        cron.zone(spec.get("timeZone"))
    except cron.ScheduleError as err:
        errors.append(("spec.timeZone", invalid(spec.get("timeZone"), str(err))))
    if spec.get("concurrencyPolicy", "Allow") not in CONCURRENCY_POLICIES:
        errors.append(("spec.concurrencyPolicy", unsupported(spec.get("concurrencyPolicy"), CONCURRENCY_POLICIES)))
    template = spec.get("jobTemplate")
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        errors.append(("spec.jobTemplate.spec", required()))
        return
    job = job_selector_defaulted({"kind": "Job", "metadata": {"name": "x"}, "spec": template["spec"]}, "validation")
    job_errors: list = []
    _validate_job(job, job_errors)
    errors += [(f"spec.jobTemplate.{path}", message) for path, message in job_errors]


def _validate_workload(obj: dict, errors: list, restart_policies: tuple = ("Always",)) -> None:
    """Deployment, ReplicaSet, DaemonSet (and a Job, with its own restart policies): a selector that
    matches the template's labels, replicas >= 0."""
    spec = _spec(obj, errors)
    if spec is None:
        return
    replicas = spec.get("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        errors.append(("spec.replicas", invalid(replicas, "must be greater than or equal to 0")))
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append(("spec.selector", required()))
        selector = None
    template = spec.get("template")
    if not isinstance(template, dict):
        errors.append(("spec.template", required()))
        return
    labels = (template.get("metadata") or {}).get("labels") or {}
    errors += _check_labels(labels, "spec.template.metadata.labels")
    if selector is not None and not _selector_matches(selector, labels):
        errors.append(("spec.template.metadata.labels",
                       invalid(labels, "`selector` does not match template `labels`")))
    template_spec = template.get("spec")
    if not isinstance(template_spec, dict):
        errors.append(("spec.template.spec", required()))
        return
    _validate_pod_spec(template_spec, "spec.template.spec", errors)
    if template_spec.get("restartPolicy", "Always") not in restart_policies:
        errors.append(("spec.template.spec.restartPolicy", unsupported(template_spec.get("restartPolicy", "Always"),
                                                                       restart_policies)))


def _selector_matches(selector: dict, labels: dict) -> bool:
    from netplane.objects import matches_label_selector
    return matches_label_selector(selector, labels)


# Ingress --------------------------------------------------------------------------------------

def _validate_ingress(obj: dict, errors: list) -> None:
    spec = _spec(obj, errors)
    if spec is None:
        return
    rules = _list(spec.get("rules"), "spec.rules", errors, need=False)
    if not rules and not spec.get("defaultBackend"):
        errors.append(("spec", invalid(spec, "either `defaultBackend` or `rules` must be specified")))
    if spec.get("defaultBackend") is not None:
        _validate_backend(spec["defaultBackend"], "spec.defaultBackend", errors)
    for index, rule in enumerate(rules):
        if isinstance(rule, dict):
            _validate_ingress_rule(rule, f"spec.rules[{index}]", errors)
    for index, tls in enumerate(_list(spec.get("tls"), "spec.tls", errors, need=False)):
        if isinstance(tls, dict):
            for h_index, host in enumerate(tls.get("hosts") or []):
                if not _valid_host(host):
                    errors.append((f"spec.tls[{index}].hosts[{h_index}]", invalid(host, "must be a DNS name")))


def _valid_host(host) -> bool:
    return _matches(DNS1123_SUBDOMAIN, host, 253) or _matches(WILDCARD_SUBDOMAIN, host, 253)


# What the API refuses in an Exact or Prefix path: the ways of spelling one path as another.
_INVALID_PATH_SEQUENCES = ("//", "/./", "/../", "%2f", "%2F")
_INVALID_PATH_SUFFIXES = ("/..", "/.")


def invalid_ingress_path(path: str) -> str | None:
    """Why an Exact or Prefix Ingress path is refused, in Kubernetes' words, or None. (The ingress
    proxy also skips such a rule in a standalone objects file, which never passes through the API.)"""
    for sequence in _INVALID_PATH_SEQUENCES:
        if sequence in path:
            return f"must not contain '{sequence}'"
    for suffix in _INVALID_PATH_SUFFIXES:
        if path.endswith(suffix):
            return f"cannot end with '{suffix}'"
    return None


def _validate_ingress_rule(rule: dict, path: str, errors: list) -> None:
    host = rule.get("host")
    if host and not _valid_host(host):
        errors.append((f"{path}.host", invalid(host, "must be a DNS name, optionally with a leading '*.'")))
    http = rule.get("http")
    if http is None:
        return
    if not isinstance(http, dict):
        errors.append((f"{path}.http", invalid(http, "must be an object")))
        return
    for index, item in enumerate(_list(http.get("paths"), f"{path}.http.paths", errors)):
        if not isinstance(item, dict):
            continue
        item_path = f"{path}.http.paths[{index}]"
        path_type = item.get("pathType")
        if path_type is None:
            errors.append((f"{item_path}.pathType", required()))
        elif path_type not in PATH_TYPES:
            errors.append((f"{item_path}.pathType", unsupported(path_type, PATH_TYPES)))
        value = item.get("path")
        if path_type in ("Exact", "Prefix"):
            if not (isinstance(value, str) and value.startswith("/")):
                errors.append((f"{item_path}.path", invalid(value, "must be an absolute path")))
            elif reason := invalid_ingress_path(value):
                errors.append((f"{item_path}.path", invalid(value, reason)))
        elif value and not (isinstance(value, str) and value.startswith("/")):
            errors.append((f"{item_path}.path", invalid(value, "must be an absolute path")))
        if "backend" not in item:
            errors.append((f"{item_path}.backend", required()))
        else:
            _validate_backend(item["backend"], f"{item_path}.backend", errors)


def _validate_backend(backend, path: str, errors: list) -> None:
    if not isinstance(backend, dict):
        errors.append((path, invalid(backend, "must be an object")))
        return
    if backend.get("resource") is not None:
        return
    service = backend.get("service")
    if not isinstance(service, dict):
        errors.append((f"{path}.service", required()))
        return
    if not service.get("name"):
        errors.append((f"{path}.service.name", required()))
    port = service.get("port")
    if not isinstance(port, dict) or ("number" not in port and not port.get("name")):
        errors.append((f"{path}.service.port", required()))
    elif "number" in port:
        _port_number(port["number"], f"{path}.service.port.number", errors)


# EndpointSlice, Node, ConfigMap/Secret ---------------------------------------------------------

def _validate_endpointslice(obj: dict, errors: list) -> None:
    address_type = obj.get("addressType")
    if not address_type:
        errors.append(("addressType", required()))
    elif address_type not in ADDRESS_TYPES:
        errors.append(("addressType", unsupported(address_type, ADDRESS_TYPES)))
    for index, endpoint in enumerate(_list(obj.get("endpoints"), "endpoints", errors, need=False)):
        if not isinstance(endpoint, dict):
            continue
        addresses = _list(endpoint.get("addresses"), f"endpoints[{index}].addresses", errors, of_objects=False)
        for a_index, address in enumerate(addresses):
            if address_type in ADDRESS_TYPES and not _valid_address(address_type, address):
                errors.append((f"endpoints[{index}].addresses[{a_index}]",
                               invalid(address, f"must be a valid {address_type} address")))
    for index, port in enumerate(_list(obj.get("ports"), "ports", errors, need=False)):
        if not isinstance(port, dict):
            continue
        if port.get("port") is not None:
            _port_number(port["port"], f"ports[{index}].port", errors, allow_zero=True)
        if port.get("protocol", "TCP") not in PROTOCOLS:
            errors.append((f"ports[{index}].protocol", unsupported(port["protocol"], PROTOCOLS)))


def _validate_endpoints(obj: dict, errors: list) -> None:
    """core/v1 Endpoints: every address an IP, every port a port (a user's, for a Service without a
    selector, becomes EndpointSlices the proxy routes to: netplane.controllers.mirrored_slices)."""
    for index, subset in enumerate(_list(obj.get("subsets"), "subsets", errors, need=False)):
        if not isinstance(subset, dict):
            continue
        for key in ("addresses", "notReadyAddresses"):
            for a_index, address in enumerate(_list(subset.get(key), f"subsets[{index}].{key}", errors, need=False)):
                ip = address.get("ip") if isinstance(address, dict) else None
                if not (_valid_address("IPv4", ip) or _valid_address("IPv6", ip)):
                    errors.append((f"subsets[{index}].{key}[{a_index}].ip",
                                   required() if ip is None else invalid(ip, "must be a valid IP address")))
        for p_index, port in enumerate(_list(subset.get("ports"), f"subsets[{index}].ports", errors, need=False)):
            if not isinstance(port, dict):
                continue
            _port_number(port.get("port"), f"subsets[{index}].ports[{p_index}].port", errors)
            if port.get("protocol", "TCP") not in PROTOCOLS:
                errors.append((f"subsets[{index}].ports[{p_index}].protocol", unsupported(port["protocol"], PROTOCOLS)))


def _valid_address(address_type, address) -> bool:
    if address_type == "FQDN":
        return _matches(DNS1123_SUBDOMAIN, address, 253)
    try:
        ip = ipaddress.ip_address(address)
    except (ValueError, TypeError):
        return False
    return ip.version == (4 if address_type == "IPv4" else 6)


def _validate_node(obj: dict, errors: list) -> None:
    spec = obj.get("spec") or {}
    for index, cidr in enumerate([spec.get("podCIDR")] + list(spec.get("podCIDRs") or [])):
        if cidr:
            try:
                ipaddress.ip_network(cidr)
            except (ValueError, TypeError):
                field = "spec.podCIDR" if index == 0 else f"spec.podCIDRs[{index - 1}]"
                errors.append((field, invalid(cidr, "must be a valid CIDR, e.g. 10.244.1.0/24")))


def _validate_data(obj: dict, errors: list) -> None:
    for field in ("data", "stringData", "binaryData"):
        value = obj.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            errors.append((field, invalid(value, "must be a map of string to string")))
            continue
        for key in value:
            if not _matches(CONFIG_KEY, key, 253):
                errors.append((f"{field}[{key}]", invalid(key, "a valid config key must consist of "
                               "alphanumeric characters, '-', '_' or '.'")))


_VALIDATORS: dict[str, Callable[[dict, list], None]] = {
    "Service": _validate_service,
    "Pod": _validate_pod,
    "Deployment": _validate_workload,
    "ReplicaSet": _validate_workload,
    "DaemonSet": _validate_workload,
    "StatefulSet": _validate_workload,
    "Job": _validate_job,
    "CronJob": _validate_cronjob,
    "Ingress": _validate_ingress,
    "EndpointSlice": _validate_endpointslice,
    "Endpoints": _validate_endpoints,
    "Node": _validate_node,
    "ConfigMap": _validate_data,
    "Secret": _validate_data,
}


# --- updates ---------------------------------------------------------------------------------

def validate_update(old: dict, new: dict) -> list[FieldError]:
    """Fields that may not change once set (Kubernetes' immutable fields that matter here)."""
    errors: list[FieldError] = []
    kind = new.get("kind")
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    if kind == "Service":
        old_ip, new_ip = old_spec.get("clusterIP"), new_spec.get("clusterIP")
        switching_to_external = new_spec.get("type") == "ExternalName"
        if old_ip and new_ip and old_ip != new_ip and not switching_to_external:
            errors.append(("spec.clusterIP", invalid(new_ip, "field is immutable")))
    if kind in ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job") \
            and old_spec.get("selector") != new_spec.get("selector"):
        errors.append(("spec.selector", invalid(new_spec.get("selector"), "field is immutable")))
    if kind == "Pod":
        old_node, new_node = old_spec.get("nodeName"), new_spec.get("nodeName")
        if old_node and new_node != old_node:
            errors.append(("spec.nodeName", invalid(new_node, "field is immutable once set")))
        now = {c.get("name"): c for c in new_spec.get("ephemeralContainers") or [] if isinstance(c, dict)}
        for before in old_spec.get("ephemeralContainers") or []:
            name = before.get("name")
            if now.get(name) != before:
                what = "removed" if name not in now else "changed"
                errors.append(("spec.ephemeralContainers", f'Forbidden: existing ephemeral containers "{name}" '
                                                           f"may not be {what}"))
    if kind == "EndpointSlice" and old.get("addressType") != new.get("addressType"):
        errors.append(("addressType", invalid(new.get("addressType"), "field is immutable")))
    if kind == "Node":
        # As Kubernetes: a node's pod range is set once; its pods' addresses come from it.
        for field in ("podCIDR", "podCIDRs"):
            if old_spec.get(field) and new_spec.get(field) != old_spec.get(field):
                errors.append((f"spec.{field}", invalid(new_spec.get(field),
                                                        f"node updates may not change {field} except from \"\" to valid")))
    return errors
