"""Make the TLS certificates and SuperNode keys a deployment needs (no openssl required).

Coordinator (once, on the machine that will run the SuperLink):
    python -m server.certs --out certs --host coordinator.example.org --ip 10.0.0.5
        -> certs/ca.crt      the CA certificate: copy to every hospital and to the operator
           certs/ca.key      the CA's private key: keep offline; it can sign new certificates
           certs/server.crt  the SuperLink's certificate (signed by the CA, names as SANs)
           certs/server.key  the SuperLink's private key: never leaves the coordinator

Each hospital (once, on its own machine):
    python -m server.certs hospital-key --out keys --name hospital-1
        -> keys/hospital-1.key  the SuperNode's private key (flower-supernode
                                --auth-supernode-private-key): never leaves the hospital
           keys/hospital-1.pub  its public key: send it to the operator, who registers it
                                with `flwr supernode register keys/hospital-1.pub <connection>`

Formats are the ones Flower 1.42 loads: PEM certificates and keys for the SuperLink's
--ssl-* flags; for SuperNode authentication an ECDSA P-384 key, the private half in OpenSSH
format (flower-supernode reads it with `load_ssh_private_key`) and the public half as one
OpenSSH line (`flwr supernode register` reads it with `load_ssh_public_key` and accepts only
NIST curves). Private keys are created with mode 0600. Existing files are never overwritten.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import UserError

DEFAULT_DAYS = 365  # validity of the CA and the server certificate
MAX_DAYS = 3650  # ten years; a longer-lived key is a liability, not a convenience
TLS_CURVE = ec.SECP256R1()  # P-256: supported by every TLS stack Flower's gRPC and HTTP servers use
NODE_CURVE = ec.SECP384R1()  # P-384: the curve Flower's SuperNode authentication docs use
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BadArgument(UserError):
    """A flag's value is wrong (exit status 2, like any other argument error)."""


# --------------------------------------------------------------------------- writing files

def _refuse_existing(paths: list[Path]) -> None:
    """Check every target before writing any, so a refusal leaves nothing half-made."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise UserError(f"refusing to overwrite {', '.join(existing)}: move them away or choose another --out")


def _prepare_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out directory {out}: {error.strerror}") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (O_EXCL: never replaces an existing file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UserError(f"refusing to overwrite {path}: move it away or choose another --out") from None
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --------------------------------------------------------------------------- certificates

def _check_hosts(hosts: list[str]) -> list[str]:
    for host in hosts:
        name = host[:-1] if host.endswith(".") else host
        if not name or len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
            raise BadArgument(f"--host {host!r} is not a valid DNS name (letters, digits, '-' and '.'; "
                            "IP addresses go in --ip)")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            continue
        raise BadArgument(f"--host {host!r} is an IP address: pass it with --ip instead")
    return hosts


def _check_ips(ips: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for text in ips:
        try:
            out.append(ipaddress.ip_address(text.strip("[]")))
        except ValueError:
            raise BadArgument(f"--ip {text!r} is not an IPv4 or IPv6 address") from None
    return out


def make_ca(days: int, common_name: str = "hospital-fl federation CA"):
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = ec.generate_private_key(TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert, hosts: list[str], ips: list, days: int):
    """The SuperLink's certificate: every name and address it is reached by, as subjectAltNames."""
    key = ec.generate_private_key(TLS_CURVE)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ip) for ip in ips]
    common_name = hosts[0] if hosts else str(ips[0])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def create_coordinator_certs(out: Path, hosts: list[str], ips: list[str], days: int = DEFAULT_DAYS) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.crt, server.key into `out`; refuse if any exists."""
    if not hosts and not ips:
        raise BadArgument("give at least one --host or --ip: the names hospitals use to reach the coordinator")
    if not 1 <= days <= MAX_DAYS:
        raise BadArgument(f"--days must be between 1 and {MAX_DAYS}, got {days}")
    hosts = _check_hosts(list(dict.fromkeys(hosts)))
    addresses = _check_ips(list(dict.fromkeys(ips)))
    paths = {name: out / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    _prepare_dir(out)
    _refuse_existing(list(paths.values()))

    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, addresses, days)
    # Keys first: if anything fails later, no certificate points at a missing key.
    _write(paths["ca.key"], _pem_private(ca_key), 0o600)
    _write(paths["server.key"], _pem_private(server_key), 0o600)
    _write(paths["ca.crt"], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["server.crt"], server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


# --------------------------------------------------------------------------- SuperNode keys

def create_hospital_key(out: Path, name: str) -> dict[str, Path]:
    """Write NAME.key (OpenSSH private, 0600) and NAME.pub (OpenSSH public line) into `out`."""
    if not _KEY_NAME.match(name):
        raise BadArgument(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), "
                        "starting with a letter or digit")
    paths = {"private": out / f"{name}.key", "public": out / f"{name}.pub"}
    _prepare_dir(out)
    _refuse_existing(list(paths.values()))
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(paths["private"], private, 0o600)
    _write(paths["public"], public + f" {name}\n".encode(), 0o644)
    return paths


# --------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (exit 2), not a usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _coordinator_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m server.certs",
        description="Create the federation's CA and the coordinator's (SuperLink's) TLS certificate. "
                    "For a hospital's SuperNode key use: python -m server.certs hospital-key --help",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write ca.crt, ca.key, server.crt, server.key")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="DNS name hospitals use to reach the coordinator (repeatable); "
                             "localhost only if you ask for it")
    parser.add_argument("--ip", action="append", default=[], metavar="ADDR",
                        help="IP address hospitals use to reach the coordinator (repeatable); "
                             "127.0.0.1 only if you ask for it")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default {DEFAULT_DAYS})")
    return parser


def _hospital_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m server.certs hospital-key",
        description="Create a hospital's SuperNode authentication key pair (ECDSA P-384, OpenSSH format).",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write NAME.key and NAME.pub")
    parser.add_argument("--name", required=True, help="the hospital's name, used for the file names and the key comment")
    return parser


def _report_coordinator(paths: dict[str, Path], hosts: list[str], ips: list[str]) -> str:
    names = ", ".join(hosts + ips)
    return "\n".join([
        f"Created the federation CA and the coordinator certificate (valid for: {names}).",
        f"  {paths['ca.crt']}      -> copy to every hospital and to the operator (flower-supernode "
        "--root-certificates; root-certificates in the Flower Configuration)",
        f"  {paths['server.crt']}  -> stays on the coordinator (flower-superlink --ssl-certfile)",
        f"  {paths['server.key']}  -> stays on the coordinator, mode 0600 (flower-superlink --ssl-keyfile)",
        f"  {paths['ca.key']}      -> keep offline, mode 0600: whoever holds it can impersonate the coordinator",
        "Hospitals must reach the coordinator by one of the names above, or TLS verification fails.",
    ])


def _report_hospital(paths: dict[str, Path], name: str) -> str:
    return "\n".join([
        f"Created the SuperNode authentication key pair for {name}.",
        f"  {paths['private']}  -> stays on this hospital's machine, mode 0600 "
        "(flower-supernode --auth-supernode-private-key)",
        f"  {paths['public']}  -> send to the operator, who registers it: "
        f"flwr supernode register {paths['public'].name} <connection>",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["hospital-key"]:
            args = _hospital_parser().parse_args(argv[1:])
            paths = create_hospital_key(args.out, args.name)
            print(_report_hospital(paths, args.name))
        else:
            if argv[:1] == ["coordinator"]:
                argv = argv[1:]
            args = _coordinator_parser().parse_args(argv)
            paths = create_coordinator_certs(args.out, args.host, args.ip, args.days)
            print(_report_coordinator(paths, args.host, args.ip))
    except BadArgument as error:
        print(f"python -m server.certs: error: {error} (see --help)", file=sys.stderr)
        return 2
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
