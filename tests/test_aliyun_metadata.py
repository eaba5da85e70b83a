"""The aliyun provider's identity and credentials: instance metadata (token and plain mode), RAM-role
STS keys refreshed before expiry, the credentials file's permission check, config over metadata, and no
secret in any log line, exception or repr. Everything runs against fakes on 127.0.0.1."""
from __future__ import annotations

import logging
import os
import time

import pytest
from aliyun_fakes import ApiHandler, ApiState, MetadataHandler, MetadataState, closed_port, serve

from vpcnet.cloud.aliyun.credentials import parse_credentials_text
from vpcnet.cloud.aliyun.provider import AliyunProvider
from vpcnet.cloud.aliyun.signature import percent_encode
from vpcnet.config import Config
from vpcnet.errors import Fatal, Retryable

ROLE = "vpcnet-role"
EMPTY_LIST = (200, {"RouteEntrys": {"RouteEntry": []}})


@pytest.fixture
def metadata():
    state = MetadataState()
    url, stop = serve(MetadataHandler, state)
    state.url = url
    try:
        yield state
    finally:
        stop()


@pytest.fixture
def api():
    state = ApiState(secrets={"AK-config": "SK-config-secret"},
                     answers={"DescribeRouteEntryList": EMPTY_LIST})
    url, stop = serve(ApiHandler, state)
    state.url = url + "/"
    try:
        yield state
    finally:
        stop()


@pytest.fixture
def providers():
    made = []
    yield made
    for p in made:
        p.close()


def make(providers, **kw) -> AliyunProvider:
    values = dict(provider="aliyun", aliyun_route_table_id="vtb-test", aliyun_metadata_url="http://127.0.0.1:9")
    values.update(kw)
    p = AliyunProvider(Config(**values))
    providers.append(p)
    return p


def iso_in(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))


def sts(key_id: str, secret: str, token: str, expires_in: float) -> dict:
    return {"Code": "Success", "AccessKeyId": key_id, "AccessKeySecret": secret, "SecurityToken": token,
            "Expiration": iso_in(expires_in), "LastUpdated": iso_in(-60)}


# -- metadata ------------------------------------------------------------------------------------------
def test_token_mode_reads_identity_with_a_session_token(metadata, api, providers):
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_access_key_id="AK-config", aliyun_access_key_secret="SK-config-secret")
    assert p.instance_id() == "i-meta0001"
    assert p.list_routes() == []
    assert api.calls[-1]["RegionId"] == "cn-meta-1"
    method, path, headers = metadata.requests[0]
    assert (method, path) == ("PUT", "/latest/api/token")
    assert headers["X-aliyun-ecs-metadata-token-ttl-seconds"] == "21600"
    gets = [r for r in metadata.requests if r[0] == "GET"]
    assert {g[1] for g in gets} == {"/latest/meta-data/instance-id", "/latest/meta-data/region-id"}
    assert all(g[2].get("X-aliyun-ecs-metadata-token") == "tok-1" for g in gets)
    assert [r[0] for r in metadata.requests].count("PUT") == 1   # one token for all reads


@pytest.mark.parametrize("refusal", [404, 403])
def test_plain_mode_when_the_token_request_is_refused(metadata, api, providers, refusal):
    metadata.token_mode = False
    metadata.refuse_status = refusal
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_access_key_id="AK-config", aliyun_access_key_secret="SK-config-secret")
    assert p.instance_id() == "i-meta0001"
    assert p.vpc_id() == "vpc-meta0001"
    assert p.region() == "cn-meta-1"
    assert [r[0] for r in metadata.requests].count("PUT") == 1   # refused once, not asked again
    assert all("X-aliyun-ecs-metadata-token" not in r[2] for r in metadata.requests if r[0] == "GET")


def test_an_expired_metadata_token_is_renewed(metadata, providers):
    p = make(providers, aliyun_metadata_url=metadata.url, aliyun_access_key_id="AK-config",
             aliyun_access_key_secret="SK-config-secret")
    assert p.instance_id() == "i-meta0001"
    metadata.tokens[:] = ["tok-x"]            # the service forgot tok-1
    assert p.vpc_id() == "vpc-meta0001"
    assert [r[0] for r in metadata.requests].count("PUT") == 2


def test_identity_values_are_read_once(metadata, providers):
    p = make(providers, aliyun_metadata_url=metadata.url, aliyun_access_key_id="AK-config",
             aliyun_access_key_secret="SK-config-secret")
    for _ in range(3):
        assert p.instance_id() == "i-meta0001"
    assert sum(1 for r in metadata.requests if r[1].endswith("/instance-id")) == 1


def test_config_values_win_over_metadata(metadata, api, providers):
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_instance_id="i-conf", aliyun_vpc_id="vpc-conf",
             aliyun_access_key_id="AK-config", aliyun_access_key_secret="SK-config-secret")
    assert p.instance_id() == "i-conf"
    assert p.vpc_id() == "vpc-conf"
    assert p.list_routes() == []
    assert api.calls[-1]["RegionId"] == "cn-conf-1"
    assert metadata.requests == []


def test_unreachable_metadata_is_retryable_and_says_what_to_set(providers):
    p = make(providers, aliyun_metadata_url=f"http://127.0.0.1:{closed_port()}",
             aliyun_access_key_id="AK-config", aliyun_access_key_secret="SK-config-secret")
    start = time.monotonic()
    with pytest.raises(Retryable, match="metadata service .* unreachable.*VPCNET_ALIYUN_"):
        p.instance_id()
    assert time.monotonic() - start < 5


def test_missing_metadata_value_is_fatal(metadata, providers):
    del metadata.values["vpc-id"]
    p = make(providers, aliyun_metadata_url=metadata.url, aliyun_access_key_id="AK-config",
             aliyun_access_key_secret="SK-config-secret")
    with pytest.raises(Fatal, match="VPC id"):
        p.vpc_id()


# -- RAM role --------------------------------------------------------------------------------------------
def sts_api(api, *keys):
    for key_id, secret, token in keys:
        api.secrets[key_id] = secret
        api.tokens[key_id] = token


def test_ram_role_keys_are_used_with_their_security_token(metadata, api, providers):
    metadata.roles[ROLE] = [sts("STS.one", "sts-secret-one", "sts-token-one", 3600)]
    sts_api(api, ("STS.one", "sts-secret-one", "sts-token-one"))
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_ram_role=ROLE)
    assert p.list_routes() == []
    assert p.list_routes() == []
    assert api.calls[-1]["AccessKeyId"] == "STS.one"
    assert api.calls[-1]["SecurityToken"] == "sts-token-one"
    fetches = [r for r in metadata.requests if "security-credentials" in r[1]]
    assert len(fetches) == 1                      # far from expiry: not fetched again


def test_ram_role_keys_are_refreshed_before_they_expire(metadata, api, providers):
    # The first keys expire in 2 minutes, inside the refresh margin: the next call must fetch new ones.
    metadata.roles[ROLE] = [sts("STS.one", "sts-secret-one", "sts-token-one", 120),
                            sts("STS.two", "sts-secret-two", "sts-token-two", 3600)]
    sts_api(api, ("STS.one", "sts-secret-one", "sts-token-one"), ("STS.two", "sts-secret-two", "sts-token-two"))
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_ram_role=ROLE)
    p.list_routes()
    assert (api.calls[-1]["AccessKeyId"], api.calls[-1]["SecurityToken"]) == ("STS.one", "sts-token-one")
    p.list_routes()
    assert (api.calls[-1]["AccessKeyId"], api.calls[-1]["SecurityToken"]) == ("STS.two", "sts-token-two")
    p.list_routes()
    assert api.calls[-1]["AccessKeyId"] == "STS.two"
    assert len([r for r in metadata.requests if "security-credentials" in r[1]]) == 2


def test_valid_keys_are_kept_when_a_refresh_fails(metadata, api, providers, caplog):
    metadata.roles[ROLE] = [sts("STS.one", "sts-secret-one", "sts-token-one", 120)]
    sts_api(api, ("STS.one", "sts-secret-one", "sts-token-one"))
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_ram_role=ROLE)
    p.list_routes()
    metadata.roles.clear()                        # the refresh now answers 404
    with caplog.at_level(logging.WARNING, logger="vpcnet"):
        p.list_routes()
    assert api.calls[-1]["AccessKeyId"] == "STS.one"
    assert "refreshing credentials failed" in caplog.text


def test_expired_sts_answer_is_retryable_and_fetches_new_keys(metadata, api, providers):
    metadata.roles[ROLE] = [sts("STS.one", "sts-secret-one", "sts-token-one", 3600),
                            sts("STS.two", "sts-secret-two", "sts-token-two", 3600)]
    sts_api(api, ("STS.one", "sts-secret-one", "sts-token-one"), ("STS.two", "sts-secret-two", "sts-token-two"))
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_ram_role=ROLE)
    api.answers["DescribeRouteEntryList"] = (400, {"Code": "InvalidSecurityToken.Expired",
                                                   "Message": "Specified SecurityToken is expired."})
    with pytest.raises(Retryable, match="InvalidSecurityToken.Expired"):
        p.list_routes()
    api.answers["DescribeRouteEntryList"] = EMPTY_LIST
    p.list_routes()
    assert api.calls[-1]["AccessKeyId"] == "STS.two"


def test_unknown_ram_role_is_fatal(metadata, api, providers):
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_ram_role="no-such-role")
    with pytest.raises(Fatal, match="RAM role no-such-role is not attached"):
        p.list_routes()


# -- credentials file -----------------------------------------------------------------------------------
def write_credentials(tmp_path, mode: int, text: str = None) -> str:
    path = tmp_path / "aliyun.credentials"
    path.write_text(text or "[default]\naccess_key_id = AK-config\naccess_key_secret = \"SK-config-secret\"\n")
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_credentials_file_readable_by_others_is_refused(tmp_path, api, providers, mode):
    path = write_credentials(tmp_path, mode)
    p = make(providers, aliyun_endpoint=api.url, aliyun_region_id="cn-conf-1", aliyun_credentials_file=path)
    with pytest.raises(Fatal, match="chmod 600") as err:
        p.list_routes()
    assert f"{mode:04o}" in str(err.value)
    assert "SK-config-secret" not in str(err.value)
    assert api.calls == []


def test_credentials_file_0600_is_used(tmp_path, api, providers):
    path = write_credentials(tmp_path, 0o600)
    p = make(providers, aliyun_endpoint=api.url, aliyun_region_id="cn-conf-1", aliyun_credentials_file=path)
    assert p.list_routes() == []
    assert api.calls[-1]["AccessKeyId"] == "AK-config"


def test_credentials_file_is_reloaded_when_it_changes(tmp_path, api, providers):
    api.secrets["AK-rotated"] = "SK-rotated"
    path = write_credentials(tmp_path, 0o600)
    p = make(providers, aliyun_endpoint=api.url, aliyun_region_id="cn-conf-1", aliyun_credentials_file=path)
    p.list_routes()
    write_credentials(tmp_path, 0o600, "access_key_id=AK-rotated\naccess_key_secret=SK-rotated\n# rotated\n")
    p.list_routes()
    assert api.calls[-1]["AccessKeyId"] == "AK-rotated"


def test_credentials_file_without_a_secret_is_fatal(tmp_path, providers):
    path = write_credentials(tmp_path, 0o600, "access_key_id = AK-only\n")
    p = make(providers, aliyun_region_id="cn-conf-1", aliyun_credentials_file=path)
    with pytest.raises(Fatal, match="no access_key_secret"):
        p.list_routes()


def test_missing_credentials_file_is_fatal(tmp_path, providers):
    p = make(providers, aliyun_region_id="cn-conf-1", aliyun_credentials_file=str(tmp_path / "nope"))
    with pytest.raises(Fatal, match="cannot open"):
        p.list_routes()


@pytest.mark.parametrize("text", [
    "[default]\naccess_key_id = A\naccess_key_secret = B\n",                 # INI
    'access_key_id = "A"\naccess_key_secret = \'B\'\n',                      # TOML
    "ALIBABA_CLOUD_ACCESS_KEY_ID=A\nexport ALIBABA_CLOUD_ACCESS_KEY_SECRET=B\n",  # env-style
    "# keys\nAccessKeyId: A\nAccessKeySecret: B\n",
])
def test_credentials_file_formats(text):
    assert parse_credentials_text(text) == {"access_key_id": "A", "access_key_secret": "B"}


def test_no_credentials_at_all_is_a_clear_fatal_error(providers):
    p = make(providers, aliyun_region_id="cn-conf-1")
    with pytest.raises(Fatal, match="none configured.*ACCESS_KEY_ID.*CREDENTIALS_FILE.*RAM_ROLE"):
        p.list_routes()


def test_an_access_key_id_without_its_secret_is_fatal(providers):
    p = make(providers, aliyun_region_id="cn-conf-1", aliyun_access_key_id="AK-config")
    with pytest.raises(Fatal, match="VPCNET_ALIYUN_ACCESS_KEY_SECRET is not set"):
        p.list_routes()


# -- no secret anywhere -----------------------------------------------------------------------------------
def test_no_secret_in_logs_errors_or_reprs(metadata, api, providers, caplog):
    caplog.set_level(logging.DEBUG)                  # urllib3 logs request lines at DEBUG
    metadata.roles[ROLE] = [sts("STS.one", "sts-secret-one", "sts-token-one", 120),
                            sts("STS.two", "sts-secret-two", "sts-token-two", 3600)]
    # The API knows STS.two under another secret: the call fails with SignatureDoesNotMatch, and the
    # fake echoes the string-to-sign (holding the STS token) in its message, as Alibaba Cloud does.
    api.secrets.update({"STS.one": "sts-secret-one", "STS.two": "not-the-secret"})
    api.tokens["STS.one"] = "sts-token-one"
    p = make(providers, aliyun_endpoint=api.url, aliyun_metadata_url=metadata.url,
             aliyun_region_id="cn-conf-1", aliyun_ram_role=ROLE)
    p.list_routes()
    errors = []
    with pytest.raises(Fatal, match="SignatureDoesNotMatch") as err:
        p.list_routes()
    errors.append(err.value)
    # An API message quoting the token (raw and percent-encoded) is scrubbed too.
    api.secrets["STS.two"] = "sts-secret-two"
    api.answers["DescribeRouteEntryList"] = (400, {
        "Code": "InvalidParameter", "Message": "bad token sts-token-two / " + percent_encode("sts-token-two")})
    with pytest.raises(Fatal, match="InvalidParameter") as err:
        p.list_routes()
    errors.append(err.value)
    signatures = [c["Signature"] for c in api.calls]
    secrets = ["sts-secret-one", "sts-token-one", "sts-secret-two", "sts-token-two", *signatures]
    texts = [caplog.text, repr(p), repr(p._credentials), *(str(e) for e in errors),
             *(repr(e) for e in errors)]
    for secret in secrets:
        for text in texts:
            assert secret not in text and percent_encode(secret) not in text


def test_no_config_secret_in_logs_or_errors(api, providers, caplog):
    caplog.set_level(logging.DEBUG)
    p = make(providers, aliyun_endpoint=api.url, aliyun_region_id="cn-conf-1",
             aliyun_access_key_id="AK-config", aliyun_access_key_secret="wrong-secret-value")
    with pytest.raises(Fatal, match="SignatureDoesNotMatch.*check the AccessKey secret") as err:
        p.list_routes()
    for text in (caplog.text, str(err.value), repr(p), repr(p._credentials)):
        assert "wrong-secret-value" not in text
        assert api.calls[-1]["Signature"] not in text
