import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.tls import (
    TLSError,
    certificate_names,
    check_node_key_pair,
    check_server_files,
    load_certificate,
    load_node_public_key,
    load_private_key,
    write_dev_certificates,
    write_node_keys,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    return write_dev_certificates(
        out, hosts=["superlink", "coord.example.org"], ips=["10.0.0.5"], sites=["supernode-1"]
    )


def test_server_certificate_names_every_host_address_and_loopback(certs):
    # Execute
    cert = load_certificate(certs.server_cert, expect_ca=False)
    # Assert
    assert certificate_names(cert) == {
        "superlink",
        "coord.example.org",
        "localhost",
        "10.0.0.5",
        "127.0.0.1",
        "::1",
    }
    check_server_files(
        certs.server_cert, certs.server_key, certs.ca_cert, names=["127.0.0.1", "superlink"]
    )
    site = load_certificate(certs.ca_cert.parent / "supernode-1.pem", names=["supernode-1"])
    assert site.issuer == load_certificate(certs.ca_cert, expect_ca=True).subject


def test_private_keys_are_0600_and_not_overwritten(certs):
    # Assert: permissions
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = certs.ca_key.read_bytes()
    # Execute / Assert: a second run refuses and leaves the files alone
    with pytest.raises(TLSError, match="--force"):
        write_dev_certificates(certs.ca_cert.parent, hosts=["x"], ips=[])
    assert certs.ca_key.read_bytes() == before


def test_missing_san_expiry_and_role_are_explained(certs):
    with pytest.raises(TLSError, match=r"does not name \['other.host'\]"):
        load_certificate(certs.server_cert, names=["other.host"])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(TLSError, match="expired"):
        load_certificate(certs.server_cert, now=later)
    with pytest.raises(TLSError, match="not a CA certificate"):
        load_certificate(certs.server_cert, expect_ca=True)
    with pytest.raises(TLSError, match="is a CA certificate"):
        load_certificate(certs.ca_cert, expect_ca=False)


def test_wrong_file_types_are_explained(certs, tmp_path):
    with pytest.raises(TLSError, match=r"not a PEM X\.509 certificate"):
        load_certificate(certs.server_key)
    with pytest.raises(TLSError, match="does not exist"):
        load_certificate(tmp_path / "nope.pem")
    loose = tmp_path / "loose.key"
    loose.write_bytes(certs.server_key.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(TLSError, match="chmod 600"):
        load_private_key(loose)
    with pytest.raises(TLSError, match="not an OpenSSH public key"):
        load_node_public_key(certs.server_cert)


def test_key_from_another_ca_is_rejected(certs, tmp_path):
    other = write_dev_certificates(tmp_path / "other", hosts=["superlink"], ips=[])
    with pytest.raises(TLSError, match="not issued by the CA"):
        check_server_files(other.server_cert, other.server_key, certs.ca_cert)
    with pytest.raises(TLSError, match="not the private key"):
        check_server_files(certs.server_cert, other.server_key, certs.ca_cert)


def test_site_keys_are_p384_openssh_as_flower_loads_them(tmp_path):
    # Execute
    paths = write_node_keys(tmp_path / "site")
    # Assert: the exact loaders Flower uses (supernode CLI / `flwr supernode register`)
    priv = serialization.load_ssh_private_key(paths.private_key.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(paths.public_key.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert paths.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(paths.private_key.stat().st_mode) == 0o600
    check_node_key_pair(paths.private_key, paths.public_key)
    with pytest.raises(TLSError, match="--force"):
        write_node_keys(tmp_path / "site")
    write_node_keys(tmp_path / "site", force=True)
    other = write_node_keys(tmp_path / "other")
    with pytest.raises(TLSError, match="not the public half"):
        check_node_key_pair(other.private_key, paths.public_key)


def test_rsa_public_key_is_not_accepted_for_node_auth(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / "rsa.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    with pytest.raises(TLSError, match="NIST curve"):
        load_node_public_key(pub)


def test_ca_certificate_is_a_ca(certs):
    ca = load_certificate(certs.ca_cert, expect_ca=True)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
