"""IP addresses, networks and interface addresses for the plugin, without the ipaddress module.

`import ipaddress` (it pulls in functools and collections) costs ~5 ms, paid on every exec of the plugin:
a third of the reference plugin's whole ADD. The plugin needs little of it: parse, print, compare, test
membership and overlap. Parsing and printing are the C library's (inet_pton/inet_ntop, so the text is
the same as iproute2's); the values are tuples, so equality, hashing and ordering come for free.
Elsewhere in netplane, use ipaddress.
"""
from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

_BITS = {4: 32, 6: 128}
_FAMILY = {4: AF_INET, 6: AF_INET6}


class Address(tuple):
    """(version, value): 4 or 6, and the address as an int."""
    __slots__ = ()

    def __new__(cls, version: int, value: int):
        return tuple.__new__(cls, (version, value))

    @property
    def version(self) -> int:
        return self[0]

    @property
    def packed(self) -> bytes:
        return self[1].to_bytes(_BITS[self[0]] // 8, "big")

    @property
    def is_link_local(self) -> bool:
        if self[0] == 4:
            return self[1] >> 16 == 0xA9FE            # 169.254.0.0/16
        return self[1] >> 118 == 0x3FA                # fe80::/10

    def __int__(self) -> int:
        return self[1]

    def __str__(self) -> str:
        return inet_ntop(_FAMILY[self[0]], self.packed)

    def __repr__(self) -> str:
        return f"Address({str(self)!r})"


class Network(tuple):
    """(version, first address as an int, prefix length)."""
    __slots__ = ()

    def __new__(cls, version: int, value: int, prefixlen: int):
        return tuple.__new__(cls, (version, value, prefixlen))

    @property
    def version(self) -> int:
        return self[0]

    @property
    def prefixlen(self) -> int:
        return self[2]

    @property
    def network_address(self) -> Address:
        return Address(self[0], self[1])

    @property
    def broadcast_address(self) -> Address:
        return Address(self[0], self[1] | _host_mask(self[0], self[2]))

    @property
    def num_addresses(self) -> int:
        return 1 << (_BITS[self[0]] - self[2])

    def __contains__(self, address) -> bool:
        return address[0] == self[0] and address[1] & ~_host_mask(self[0], self[2]) == self[1]

    def overlaps(self, other: "Network") -> bool:
        return other.network_address in self or self.network_address in other

    def __str__(self) -> str:
        return f"{self.network_address}/{self[2]}"

    def __repr__(self) -> str:
        return f"Network({str(self)!r})"


class Interface(tuple):
    """(Address, prefix length): an address on a link, 10.244.1.5/24."""
    __slots__ = ()

    def __new__(cls, ip: Address, prefixlen: int):
        return tuple.__new__(cls, (ip, prefixlen))

    @property
    def ip(self) -> Address:
        return self[0]

    @property
    def version(self) -> int:
        return self[0][0]

    @property
    def prefixlen(self) -> int:
        return self[1]

    @property
    def network(self) -> Network:
        version, value = self[0]
        return Network(version, value & ~_host_mask(version, self[1]), self[1])

    def __str__(self) -> str:
        return f"{self[0]}/{self[1]}"

    def __repr__(self) -> str:
        return f"Interface({str(self)!r})"


def _host_mask(version: int, prefixlen: int) -> int:
    return (1 << (_BITS[version] - prefixlen)) - 1


def ip_address(text) -> Address:
    """ValueError when `text` is not one IPv4 or IPv6 address."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an IP address string")
    version = 6 if ":" in text else 4
    try:
        packed = inet_pton(_FAMILY[version], text)
    except (OSError, ValueError):
        raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 address") from None
    return Address(version, int.from_bytes(packed, "big"))


def _split(text) -> tuple:
    """(Address, prefix length) from ADDRESS[/PREFIX]; no prefix means a single address."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an IP network string")
    address, slash, prefix = text.partition("/")
    ip = ip_address(address)
    if not slash:
        return ip, _BITS[ip.version]
    if not (prefix.isascii() and prefix.isdigit()) or int(prefix) > _BITS[ip.version]:
        raise ValueError(f"{prefix!r} is not a valid prefix length for {address}")
    return ip, int(prefix)


def ip_network(text, strict: bool = True) -> Network:
    """ADDRESS/PREFIX; with strict, ValueError when host bits are set (10.1.1.1/24)."""
    ip, prefixlen = _split(text)
    network = Interface(ip, prefixlen).network
    if strict and network[1] != ip[1]:
        raise ValueError(f"{text} has host bits set")
    return network


def ip_interface(text) -> Interface:
    return Interface(*_split(text))
