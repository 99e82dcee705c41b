"""The published JSON schema of the provenance sidecar is the one the code validates with."""

import json
from pathlib import Path

from registry.schemas import ProvenanceSidecar

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "provenance.schema.json"


def test_docs_schema_matches_the_model():
    published = json.loads(SCHEMA_FILE.read_text())
    assert published == json.loads(json.dumps(ProvenanceSidecar.model_json_schema(by_alias=True))), (
        "docs/provenance.schema.json is stale: regenerate it from registry.schemas.ProvenanceSidecar"
    )


def test_schema_names_its_version():
    published = json.loads(SCHEMA_FILE.read_text())
    assert published["properties"]["schema_version"]["const"] == 1
    assert published["properties"]["schema"]["const"] == "pem-registry/provenance"
