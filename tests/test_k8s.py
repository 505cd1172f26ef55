"""The Kubernetes example (examples/k8s/) as the API server would read it: every manifest
deserialises into the ``kubernetes`` client's models with no field dropped, the pieces point at
each other (secret keys, services, ports, volumes), and every ``flexunet`` command in them parses
with the real command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT

K8S = ROOT / "examples" / "k8s"
kubernetes = pytest.importorskip("kubernetes", reason="pip install 'flexunet-search[test]'")


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return docs


def _model(doc: dict[str, Any]) -> Any:
    """``doc`` as the client's model of its kind (V1Job, V1Deployment...)."""
    version = doc["apiVersion"].split("/")[-1]
    name = f"{version[0].upper()}{version[1:]}{doc['kind']}"

    class Response:  # what ApiClient.deserialize reads
        data = json.dumps(doc)

    return kubernetes.client.ApiClient().deserialize(Response(), name)


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _documents() if doc["kind"] == kind}


def _containers() -> list[dict[str, Any]]:
    return [c for doc in _documents() if "template" in doc.get("spec", {})
            for c in doc["spec"]["template"]["spec"]["containers"]]


def test_every_manifest_is_a_valid_kubernetes_object_with_no_unknown_field() -> None:
    docs = _documents()
    assert {doc["kind"] for doc in docs} >= {"Secret", "Service", "StatefulSet", "Deployment", "Job",
                                             "PersistentVolumeClaim"}
    client = kubernetes.client.ApiClient()
    for doc in docs:
        model = _model(doc)
        # A misspelt or misplaced field is dropped by the model: the round trip shows it.
        assert client.sanitize_for_serialization(model) == doc, doc["metadata"]["name"]


def test_the_workers_are_an_indexed_job_of_one_gpu_each_through_the_proxy() -> None:
    workers = _by_kind("Job")["flexunet-workers"]["spec"]
    assert workers["completionMode"] == "Indexed" and workers["completions"] == workers["parallelism"] > 1
    container, = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    proxy_service = _by_kind("Service")["flexunet-proxy"]
    port = proxy_service["spec"]["ports"][0]
    command = container["command"]
    assert command[command.index("--storage") + 1] == f"grpc://flexunet-proxy:{port['port']}"
    assert command[command.index("--workers") + 1] == "1"
    proxy, = _by_kind("Deployment")["flexunet-proxy"]["spec"]["template"]["spec"]["containers"]
    assert proxy["command"][proxy["command"].index("--port") + 1] == str(port["targetPort"])
    assert proxy["command"][proxy["command"].index("--host") + 1] == "0.0.0.0"
    assert proxy_service["spec"]["selector"] == _by_kind("Deployment")["flexunet-proxy"]["spec"]["selector"]["matchLabels"]


def test_secrets_services_and_volumes_named_in_the_manifests_exist() -> None:
    secrets = _by_kind("Secret")
    claims = set(_by_kind("PersistentVolumeClaim")) | {"flexunet-data"}  # the dataset: the user's own volume
    for container in _containers():
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for doc in _documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if spec:
            names = {v["name"] for v in spec.get("volumes", [])}
            for container in spec["containers"]:
                assert {m["name"] for m in container.get("volumeMounts", [])} <= names | {"data"}
            assert {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])} <= claims
    database = secrets["flexunet-db"]["stringData"]["FLEXUNET_DATABASE"]
    postgres_port = _by_kind("Service")["flexunet-postgres"]["spec"]["ports"][0]["port"]
    assert f"@flexunet-postgres:{postgres_port}/" in database


def test_every_flexunet_command_parses_and_names_files_that_exist() -> None:
    from flexunet.cli import build_parser

    parser = build_parser()
    commands = [c["command"] for c in _containers() if c.get("command", [""])[0] == "flexunet"]
    assert {cmd[2] for cmd in commands} == {"proxy", "create", "run"}
    for command in commands:
        args = parser.parse_args(command[1:])
        if getattr(args, "study_file", None):
            assert (ROOT / args.study_file).is_file(), args.study_file
    dockerfile = (K8S / "Dockerfile").read_text(encoding="utf-8")
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            assert all((ROOT / part.rstrip("/")).exists() for part in line.split()[1:-1]), line


def test_the_readme_shows_how_to_run_it() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in sorted(p.name for p in K8S.glob("*.yaml")):
        assert f"examples/k8s/{name}" in readme, name
