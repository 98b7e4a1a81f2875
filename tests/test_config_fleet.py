"""The fleet's settings: defaults from scale-out.md §7, env over YAML, checked at start."""

from __future__ import annotations

import pytest

from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.loader import build_config
from hermes_twisted.config.settings import FleetSettings


def load(doc=None, env=None):
    return build_config(doc or {}, env or {}, home="/tmp/hermes-fleet-home")


def test_defaults_are_the_documented_lease_numbers():
    assert load().fleet == FleetSettings(lease_ttl=15.0, lease_renew=5.0,
                                         self_fence_after=10.0, safety_poll=2.0,
                                         claim_ttl=30.0)


def test_yaml_keys_and_env_vars_set_them_env_winning():
    config = load({"gateway": {"fleet": {"lease_ttl": 30, "lease_renew": 3,
                                         "self_fence_after": 20, "safety_poll": 1,
                                         "claim_ttl": 60}}},
                  {"GATEWAY_FLEET_LEASE_TTL": "45", "GATEWAY_FLEET_SAFETY_POLL": "0.5"})
    assert config.fleet == FleetSettings(lease_ttl=45.0, lease_renew=3.0,
                                         self_fence_after=20.0, safety_poll=0.5,
                                         claim_ttl=60.0)


@pytest.mark.parametrize("env, key", [
    ({"GATEWAY_FLEET_LEASE_TTL": "8"}, "gateway.fleet.lease_ttl"),
    ({"GATEWAY_FLEET_SELF_FENCE_AFTER": "16"}, "gateway.fleet.lease_ttl"),
    ({"GATEWAY_FLEET_LEASE_RENEW": "10"}, "gateway.fleet.self_fence_after"),
])
def test_a_lease_that_could_lapse_before_its_owner_stops_is_refused(env, key):
    with pytest.raises(ConfigError) as caught:
        load(env=env)
    assert caught.value.key == key


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_number_names_the_variable(value):
    with pytest.raises(ConfigError, match="GATEWAY_FLEET_CLAIM_TTL"):
        load(env={"GATEWAY_FLEET_CLAIM_TTL": value})
