"""The Alibaba RPC signer: the published vector, the encoding rules, and verification."""
from vpcnet.cloud.aliyun.signature import percent_encode, sign, string_to_sign, verify

VECTOR = {
    "AccessKeyId": "testid",
    "Action": "DescribeRegions",
    "Format": "XML",
    "SignatureMethod": "HMAC-SHA1",
    "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
    "SignatureVersion": "1.0",
    "Timestamp": "2016-02-23T12:46:24Z",
    "Version": "2014-05-26",
}


def test_published_vector_signature():
    assert sign("GET", VECTOR, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_published_vector_string_to_sign():
    assert string_to_sign("GET", VECTOR) == (
        "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML"
        "%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"
        "%26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26")


def test_signature_param_is_ignored_when_signing():
    signed = dict(VECTOR, Signature="whatever")
    assert sign("GET", signed, "testsecret") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_method_is_part_of_the_signature():
    assert sign("POST", VECTOR, "testsecret") != sign("GET", VECTOR, "testsecret")
    assert sign("post", VECTOR, "testsecret") == sign("POST", VECTOR, "testsecret")


def test_space_is_percent20_not_plus():
    assert percent_encode("a b") == "a%20b"


def test_star_is_encoded():
    assert percent_encode("a*b") == "a%2Ab"


def test_tilde_and_unreserved_are_kept():
    assert percent_encode("AZaz09-_.~") == "AZaz09-_.~"


def test_reserved_characters_are_encoded_uppercase():
    assert percent_encode("/+=&:,") == "%2F%2B%3D%26%3A%2C"


def test_utf8_is_encoded_bytewise():
    assert percent_encode("é") == "%C3%A9"
    assert percent_encode("路由") == "%E8%B7%AF%E7%94%B1"


def test_non_string_values_are_stringified():
    assert percent_encode(100) == "100"


def test_parameters_are_sorted_by_name():
    a = string_to_sign("GET", {"B": "2", "A": "1"})
    assert a == "GET&%2F&A%3D1%26B%3D2"


def test_verify_accepts_the_vector():
    signed = dict(VECTOR, Signature="OLeaidS1JvxuMvnyHOwuJ+uX5qY=")
    assert verify("GET", signed, "testsecret")


def test_verify_rejects_a_tampered_parameter():
    signed = dict(VECTOR, Signature=sign("GET", VECTOR, "testsecret"))
    tampered = dict(signed, Action="DeleteRouteEntry")
    assert not verify("GET", tampered, "testsecret")


def test_verify_rejects_a_wrong_secret_and_a_missing_signature():
    signed = dict(VECTOR, Signature=sign("GET", VECTOR, "testsecret"))
    assert not verify("GET", signed, "othersecret")
    assert not verify("GET", VECTOR, "testsecret")


def test_signature_over_unicode_and_special_values_round_trips():
    params = dict(VECTOR, Description="vpcnet: host CIDR 10.200.3.0/24 of i-1 * ~ é")
    params["Signature"] = sign("POST", params, "s3cret")
    assert verify("POST", params, "s3cret")
    assert not verify("GET", params, "s3cret")
