"""kiln check escape: the probes, run inside a sandbox's guest by `python3 probes.py NAME ARGS`,
or by a probe server (`python3 probes.py serve`, see `serve`).

Each probe tries one way out of the sandbox and prints one JSON line: {"reached": bool,
"detail": str}. "reached" means the probe got what it went for (a connection, an answer, a
device it may not have); the host judges the rest (decoys that record what arrives, the
daemon's and the neighbour's health). ARGS is a JSON object; a probe's negative control runs
the same code with ARGS pointing at something it must reach, so a probe that cannot notice
success fails its control.
"""

import ctypes
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import sys
import time

def report(reached, detail, acted=False):
    """The probe's one line: whether it reached its target, what happened, and whether it
    did what it tries inside its own guest (wrote to a device, stopped the agent)."""
    print(json.dumps({"reached": bool(reached), "detail": str(detail)[:400], "acted": bool(acted)}),
          flush=True)


def connect(args):
    """TCP to host:port; optionally sends `send` and looks for `expect` in the answer
    (`until_data`: reads only until the first bytes arrive)."""
    host, port = args["host"], int(args["port"])
    try:
        s = socket.create_connection((host, port), timeout=float(args.get("timeout", 1.5)))
    except OSError as e:
        return report(False, "%s:%d: %s" % (host, port, e))
    answer = b""
    try:
        s.settimeout(1.5)
        if "send" in args:
            s.sendall(args["send"].encode())
        while len(answer) < 4096:
            more = s.recv(4096)
            if not more:
                break
            answer += more
            if args.get("expect", "").encode() in answer and "expect" in args:
                break
            if args.get("until_data"):
                break
    except OSError:
        pass
    s.close()
    if "expect" in args:
        found = args["expect"].encode() in answer
        return report(found, "connected to %s:%d, answer %r" % (host, port, answer[:120]))
    report(True, "connected to %s:%d, answer %r" % (host, port, answer[:120]))


def resolve_connect(args):
    """Resolves a name (through whatever DNS the guest has) and connects to what it got."""
    name, port = args["name"], int(args["port"])
    try:
        addresses = sorted({ai[4][0] for ai in socket.getaddrinfo(name, port, socket.AF_INET)})
    except OSError as e:
        return report(False, "%s does not resolve: %s" % (name, e))
    for address in addresses:
        try:
            socket.create_connection((address, port), timeout=1.5).close()
            return report(True, "%s resolved to %s, connected" % (name, addresses))
        except OSError:
            pass
    report(False, "%s resolved to %s, none connected" % (name, addresses))


def dns_query(name):
    query = struct.pack("!HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        query += bytes([len(label)]) + label.encode()
    return query + b"\x00" + struct.pack("!HH", 1, 1)


def dns_answers(packet):
    """The A records of a DNS answer (names compressed or not)."""
    count = struct.unpack("!H", packet[6:8])[0]

    def skip_name(at):
        while packet[at] != 0:
            if packet[at] & 0xC0 == 0xC0:
                return at + 2
            at += packet[at] + 1
        return at + 1

    at = skip_name(12) + 4
    found = []
    for _ in range(count):
        at = skip_name(at)
        kind, _, _, length = struct.unpack("!HHIH", packet[at : at + 10])
        at += 10
        if kind == 1 and length == 4:
            found.append(socket.inet_ntoa(packet[at : at + 4]))
        at += length
    return found


def dns_direct(args):
    """Asks a DNS server of its choice (not the gateway) for a name that points at a decoy."""
    server, name, forbidden = args["server"], args["name"], args["forbidden"]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.sendto(dns_query(name), (server, 53))
        answers = dns_answers(s.recv(4096))
    except OSError as e:
        return report(False, "no answer from %s: %s" % (server, e))
    report(forbidden in answers, "%s at %s answered %s" % (name, server, answers))


def scan(args):
    """Connects to every address of a range on one port at once (`until_first`: stops at the
    first connection, as a control may)."""
    network, bits = args["cidr"].split("/")
    base = struct.unpack("!I", socket.inet_aton(network))[0]
    port = int(args["port"])
    pending = {}
    for i in range(1, (1 << (32 - int(bits))) - 1):
        address = socket.inet_ntoa(struct.pack("!I", base + i))
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((address, port))
        pending[s] = address
    connected, tried = [], len(pending)
    deadline = time.time() + 2
    while pending and time.time() < deadline:
        _, writable, _ = select.select([], list(pending), [], 0.2)
        for s in writable:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected.append(pending[s])
            s.close()
            del pending[s]
        if connected and args.get("until_first"):
            break
    for s in pending:
        s.close()
    report(bool(connected), "%d addresses of %s on port %d, connected: %s"
           % (tried, args["cidr"], port, connected[:8]))


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_header(src, dst, protocol, payload_length):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_length, random.randrange(65536),
                         0, 64, protocol, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:]


def own_address():
    """The guest's address: what a UDP socket toward the outside is bound to."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("192.0.2.1", 9))
    address = s.getsockname()[0]
    s.close()
    return address


def gateway_mac():
    gateway = None
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                gateway = socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    # An ARP entry for the gateway: make one with a datagram toward it.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"", (gateway, 9))
    s.close()
    for _ in range(20):
        with open("/proc/net/arp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[0] == gateway and fields[3] != "00:00:00:00:00:00":
                    return gateway, bytes.fromhex(fields[3].replace(":", ""))
        time.sleep(0.1)
    raise OSError("no ARP entry for the gateway %s" % gateway)


def interface_mac(name="eth0"):
    with open("/sys/class/net/%s/address" % name) as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def frame_syn(args):
    """A TCP SYN in a frame of its own making, toward an address the guest's kernel would
    never route (the host's loopback) or a spoofed source; looks for the SYN-ACK."""
    dst, port = args["dst"], int(args["port"])
    try:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    except OSError as e:
        return report(False, "no packet socket: %s" % e)
    raw.bind(("eth0", 0))
    src = args.get("src") or own_address()
    _, mac = gateway_mac()
    sport = random.randrange(20000, 60000)
    tcp = struct.pack("!HHIIBBHHH", sport, port, random.randrange(1 << 32), 0, 5 << 4, 0x02,
                      64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    frame = mac + interface_mac() + b"\x08\x00" + ipv4_header(src, dst, 6, len(tcp)) + tcp
    deadline = time.time() + 2
    for _ in range(3):
        raw.send(frame)
    while time.time() < deadline:
        ready, _, _ = select.select([raw], [], [], 0.2)
        if not ready:
            continue
        packet = raw.recv(2048)
        ip = packet[14:]
        if len(ip) < 40 or ip[9] != 6:
            continue
        length = (ip[0] & 0xF) * 4
        source_port, dest_port = struct.unpack("!HH", ip[length : length + 4])
        flags = ip[length + 13]
        if source_port == port and dest_port == sport and flags & 0x12 == 0x12:
            return report(True, "SYN-ACK from %s:%d" % (socket.inet_ntoa(ip[12:16]), port))
    report(False, "no SYN-ACK from %s:%d to a SYN from %s" % (dst, port, src))


def udp_spoof(args):
    """UDP datagrams with source addresses of its choice (raw IP socket); the host looks at
    where they arrived from."""
    dst, port = args["dst"], int(args["port"])
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as e:
        return report(False, "no raw socket: %s" % e)
    for src in args["src"]:
        payload = ("%s from %s" % (args["token"], src)).encode()
        udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
        packet = ipv4_header(src, dst, 17, len(udp)) + udp
        for _ in range(3):
            raw.sendto(packet, (dst, 0))
    time.sleep(0.3)
    report(True, "sent 3 datagrams each from %s to %s:%d" % (args["src"], dst, port))


def invalid_packets(args):
    """Packets of no connection from the guest's own address (an echo reply nobody asked
    for, a TCP RST and a TCP FIN+ACK out of the blue): conntrack finds them invalid, so NAT
    leaves them untranslated, and were they to leave its namespace the host's end of the link
    would see the guest's fixed address. With `valid`, a UDP datagram that starts a flow
    instead (the control: it leaves translated, and arrives)."""
    dst, port = args["dst"], int(args["port"])
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as e:
        return report(False, "no raw socket: %s" % e)
    src = own_address()
    packets = []
    if args.get("valid"):
        payload = args["token"].encode()
        udp = struct.pack("!HHHH", 40001, port, 8 + len(payload), 0) + payload
        packets.append(ipv4_header(src, dst, 17, len(udp)) + udp)
    else:
        echo = struct.pack("!BBHHH", 0, 0, 0, random.randrange(65536), 1) + b"kiln"
        echo = echo[:2] + struct.pack("!H", checksum(echo)) + echo[4:]
        packets.append(ipv4_header(src, dst, 1, len(echo)) + echo)
        for flags in (0x04, 0x11):  # RST; FIN+ACK
            tcp = struct.pack("!HHIIBBHHH", random.randrange(20000, 60000), port,
                              random.randrange(1 << 32), random.randrange(1 << 32), 5 << 4,
                              flags, 64240, 0, 0)
            pseudo = (socket.inet_aton(src) + socket.inet_aton(dst)
                      + struct.pack("!BBH", 0, 6, len(tcp)))
            tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
            packets.append(ipv4_header(src, dst, 6, len(tcp)) + tcp)
    for packet in packets:
        for _ in range(3):
            raw.sendto(packet, (dst, 0))
    time.sleep(0.3)
    report(True, "sent %d packets 3 times each from %s to %s" % (len(packets), src, dst))


def mac_spoof(args):
    """Takes another MAC address, then connects out; the host looks at where it arrived from."""
    mac = args["mac"]
    try:
        gateway, _ = gateway_mac()
        os.system("ip link set eth0 down && ip link set eth0 address %s && ip link set eth0 up"
                  " && ip route replace default via %s" % (mac, gateway))
        if interface_mac().hex(":") != mac:
            return report(False, "could not change eth0's address")
        time.sleep(0.5)
        s = socket.create_connection((args["host"], int(args["port"])), timeout=3)
        s.sendall(args["token"].encode())
        s.close()
        report(True, "connected from %s" % mac, acted=True)
    except OSError as e:
        report(False, "with MAC %s: %s" % (mac, e))


def arp_claim(args):
    """Gratuitous ARP replies claiming addresses of the host and of another sandbox."""
    try:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    except OSError as e:
        return report(False, "no packet socket: %s" % e)
    raw.bind(("eth0", 0))
    mac = interface_mac()
    sent = 0
    for address in args["claim"]:
        ip = socket.inet_aton(address)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + mac + ip + b"\xff" * 6 + ip
        for _ in range(5):
            raw.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
            sent += 1
    time.sleep(0.5)
    report(True, "sent %d ARP replies claiming %s" % (sent, args["claim"]))


def ipv6_neighbours(args):
    """Turns IPv6 back on in the guest and asks every node on the link (or `dst`) to answer
    an echo request."""
    for path in ("/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/eth0/disable_ipv6"):
        try:
            with open(path, "w") as f:
                f.write("0")
        except OSError:
            pass
    time.sleep(1)
    dst = args.get("dst", "ff02::1%eth0")
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    except OSError:
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
        except OSError as e:
            return report(False, "no ICMPv6 socket: %s" % e)
    own = set()
    with open("/proc/net/if_inet6") as f:
        for line in f:
            own.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(line.split()[0])))
    try:
        target = socket.getaddrinfo(dst, None, socket.AF_INET6)[0][4]
        s.sendto(struct.pack("!BBHHH", 128, 0, 0, 0x6B6C, 1) + b"kiln", target)
    except OSError as e:
        return report(False, "echo to %s: %s" % (dst, e))
    deadline = time.time() + 2
    while time.time() < deadline:
        ready, _, _ = select.select([s], [], [], 0.2)
        if not ready:
            continue
        data, peer = s.recvfrom(2048)
        if data and data[0] == 129 and (peer[0] not in own or args.get("own_counts")):
            return report(True, "echo reply from %s" % peer[0])
    report(False, "no echo reply to %s (own addresses %s)" % (dst, sorted(own)))


def unix_socket(args):
    """Connects to a host path (a VMM's monitor or agent socket) from inside the guest;
    the control listens there first."""
    path = args["path"]
    listener = None
    if args.get("listen"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(1)
        s.connect(path)
        s.close()
        report(True, "connected to %s" % path)
    except OSError as e:
        report(False, "%s: %s" % (path, e))
    finally:
        if listener:
            listener.close()
            os.unlink(path)


def host_channels(args):
    """Virtio devices beyond the expected ones (a vsock, a shared filesystem), vsock to the
    host, and virtio-serial ports beyond the agent's."""
    allowed = set(args["allowed"])
    found = []
    base = "/sys/bus/virtio/devices"
    for device in sorted(os.listdir(base)):
        with open(os.path.join(base, device, "device")) as f:
            kind = int(f.read(), 16)
        if kind not in allowed:
            found.append("%s (virtio device id %d)" % (device, kind))
    ports = []
    if os.path.isdir("/sys/class/virtio-ports"):
        for port in sorted(os.listdir("/sys/class/virtio-ports")):
            try:
                with open("/sys/class/virtio-ports/%s/name" % port) as f:
                    ports.append(f.read().strip())
            except OSError:
                ports.append(port)
    for name in ports:
        if name not in args["ports"]:
            found.append("virtio-serial port %s" % name)
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect((2, 1024))
        found.append("vsock to the host")
    except (OSError, AttributeError) as e:
        vsock = str(e)
    else:
        vsock = "connected"
    report(bool(found), "unexpected: %s; ports %s; vsock: %s" % (found, ports, vsock))


def virtio_regions():
    """The virtio-mmio devices the guest's kernel found: (platform device, start)."""
    regions = []
    with open("/proc/iomem") as f:
        for line in f:
            if "LNRO0005" in line and not line.startswith(" "):
                span, name = line.split(" : ")
                regions.append((name.strip(), int(span.split("-")[0], 16)))
    return regions


def devmem_poke(args):
    """Garbage into every virtio-mmio device's registers through /dev/mem, as a root that
    first unbinds the guest's drivers (the kernel refuses /dev/mem on a region a driver
    holds): queue sizes and addresses pointing anywhere, the queues notified, the status
    scrambled. The control reads a free transport's magic value the same way."""
    try:
        fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
    except OSError as e:
        return report(False, "/dev/mem: %s" % e)
    if args.get("dry"):
        # The first transport of QEMU's microvm, one with no device behind it.
        m = mmap.mmap(fd, 0x1000, offset=0xFEB00000)
        magic = m[0:4]
        return report(magic == b"virt", "a free virtio-mmio transport's magic: %r" % magic)
    regions = virtio_regions()
    unbound = []
    for name, _ in regions:
        try:
            with open("/sys/bus/platform/drivers/virtio-mmio/unbind", "w") as f:
                f.write(name)
            unbound.append(name)
        except OSError:
            pass
    rng = random.Random(int(args.get("seed", 1)))
    writes, errors = 0, []
    for _, start in regions:
        page = start & ~0xFFF
        try:
            m = mmap.mmap(fd, 0x1000, offset=page)
        except OSError as e:
            errors.append("%x: %s" % (start, e))
            continue
        at = start - page
        for queue in range(4):
            for offset, value in ((0x30, queue), (0x38, rng.choice([0, 1, 0xFFFF, rng.randrange(1 << 32)])),
                                  (0x80, rng.randrange(1 << 32)), (0x84, rng.randrange(1 << 32)),
                                  (0x90, rng.randrange(1 << 32)), (0xA0, rng.randrange(1 << 32)),
                                  (0x44, 1), (0x50, queue), (0x70, rng.randrange(256))):
                m[at + offset : at + offset + 4] = struct.pack("<I", value)
                writes += 1
        m.close()
    report(False, "unbound %s; %d register writes to %d devices; %s"
           % (unbound, writes, len(regions), errors or "no mapping refused"), acted=writes > 0)


def ioport_poke(args):
    """Garbage to the emulated chipset's I/O ports through /dev/port (PIC, PIT, RTC, serial,
    fw_cfg, PCI configuration, reset)."""
    try:
        fd = os.open("/dev/port", os.O_RDWR)
    except OSError as e:
        return report(False, "/dev/port: %s" % e)
    if args.get("dry"):
        os.lseek(fd, 0x71, os.SEEK_SET)
        value = os.read(fd, 1)
        return report(len(value) == 1, "read the RTC's data port: %r" % value)
    rng = random.Random(int(args.get("seed", 1)))
    ports = [0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x3F8, 0x3F9,
             0x3FB, 0x3FC, 0x510, 0x511, 0x514, 0xCF8, 0xCFC, 0x600, 0x604, 0x92, 0x64]
    writes = 0
    for _ in range(5):
        for port in ports:
            os.lseek(fd, port, os.SEEK_SET)
            try:
                os.write(fd, bytes([rng.randrange(256)]))
                writes += 1
            except OSError:
                pass
    report(False, "%d port writes" % writes, acted=writes > 0)


def console_flood(args):
    """Writes to the serial console as fast as it goes for `seconds`."""
    try:
        fd = os.open("/dev/ttyS0", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        return report(False, "/dev/ttyS0: %s" % e)
    chunk = (b"kiln console flood " * 200)[:4096]
    written, deadline = 0, time.time() + float(args.get("seconds", 5))
    while time.time() < deadline:
        try:
            written += os.write(fd, chunk)
        except BlockingIOError:
            select.select([], [fd], [], 0.1)
    report(bool(args.get("dry")) and written > 0, "%d bytes written to the console" % written,
           acted=written > 0)


def agent_fd():
    """Opens PID 1's (the agent's) channel to the host the way a root process can: a
    duplicate of its descriptor (pidfd_getfd), as the device itself is held exclusively."""
    target = os.path.realpath("/dev/vport0p1")
    number = None
    for fd in os.listdir("/proc/1/fd"):
        try:
            if os.readlink("/proc/1/fd/%s" % fd) == target:
                number = int(fd)
                break
        except OSError:
            pass
    if number is None:
        raise OSError("no descriptor of %s in the agent" % target)
    pidfd = os.pidfd_open(1)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(438, pidfd, number, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd: %s" % os.strerror(ctypes.get_errno()))
    return fd


def agent_garbage(args):
    """The host's client of the agent fed garbage: the agent's own channel, taken from it,
    carries random bytes and frames claiming huge lengths."""
    try:
        with open("/dev/vport0p1", "wb") as f:
            if not args.get("dry"):
                f.write(b"\xff" * 64)
        opened = "opened /dev/vport0p1 directly"
    except OSError as e:
        opened = "/dev/vport0p1: %s" % e
    try:
        fd = agent_fd()
    except OSError as e:
        return report(False, "%s; %s" % (opened, e))
    if args.get("dry"):
        os.close(fd)
        return report(True, "%s; took the agent's descriptor" % opened)
    rng = random.Random(int(args.get("seed", 1)))
    written = 0
    for i in range(256):
        if i % 4 == 0:
            data = struct.pack("<I", 0xFFFFFFF0) + bytes(rng.randrange(256) for _ in range(60))
        else:
            data = bytes(rng.randrange(256) for _ in range(4096))
        try:
            written += os.write(fd, data)
        except OSError:
            break
    report(False, "%s; wrote %d bytes of garbage on the agent's channel" % (opened, written),
           acted=written > 0)


def agent_hang(args):
    """Stops the agent (ptrace-attached by a process that outlives this one), so the guest
    never answers the host again."""
    libc = ctypes.CDLL(None, use_errno=True)
    read, write = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            attached = libc.ptrace(16, 1, 0, 0) == 0
            message = "attached" if attached else "ptrace: %s" % os.strerror(ctypes.get_errno())
            os.write(write, message.encode())
            if attached and args.get("dry"):
                # Detach only once the agent has stopped (or it could stay stopped).
                os.waitpid(1, 0x40000000)  # __WALL
                libc.ptrace(17, 1, 0, 0)
            elif attached:
                time.sleep(3600)
            os._exit(0)
        os._exit(0)
    os.close(write)
    message = os.read(read, 200).decode()
    attached = message == "attached"
    report(attached and args.get("dry"), "the agent: %s" % message, acted=attached)


def kernel_panic(args):
    """Crashes the guest's kernel."""
    try:
        f = open("/proc/sysrq-trigger", "w")
    except OSError as e:
        return report(False, "/proc/sysrq-trigger: %s" % e)
    if args.get("dry"):
        f.close()
        return report(True, "/proc/sysrq-trigger is writable")
    f.write("c")
    f.close()
    report(False, "still running after a crash")


def disk_overwrite(args):
    """Random bytes over the guest's whole root device (its first `mib` MiB), synced."""
    try:
        fd = os.open("/dev/vda", os.O_RDWR)
    except OSError as e:
        return report(False, "/dev/vda: %s" % e)
    if args.get("dry"):
        return report(len(os.read(fd, 4096)) == 4096, "/dev/vda opened for writing, read back")
    rng = random.Random(int(args.get("seed", 1)))
    block = bytes(rng.randrange(256) for _ in range(1 << 16))
    written = 0
    for _ in range(int(args.get("mib", 32)) * 16):
        written += os.write(fd, block)
    os.fsync(fd)
    report(False, "%d MiB of random bytes written over /dev/vda" % (written >> 20), acted=True)


PROBES = {f.__name__: f for f in (
    connect, resolve_connect, dns_direct, scan, frame_syn, udp_spoof, invalid_packets, mac_spoof,
    arp_claim,
    ipv6_neighbours, unix_socket, host_channels, devmem_poke, ioport_poke, console_flood,
    agent_garbage, agent_hang, kernel_panic, disk_overwrite)}

def run(name, args):
    try:
        PROBES[name](json.loads(args) if isinstance(args, str) else args)
    except Exception as e:  # A probe that breaks is a probe that did not get through.
        report(False, "%s: %s" % (type(e).__name__, e))


def serve():
    """Runs probes on request, each in a child forked from this process, so that a probe
    does not pay Python's start (seconds under emulation). Requests arrive one per line on
    the FIFO /tmp/kiln-probe-UID.in as "REPLY NAME ARGS" (ARGS: the probe's JSON object); the
    child writes its report to the FIFO REPLY, which the requesting exec reads. The FIFO
    appears only once ready (made under another name, then renamed)."""
    path = "/tmp/kiln-probe-%d.in" % os.getuid()
    staging = path + ".new"
    for stale in (path, staging):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    os.mkfifo(staging, 0o600)
    os.rename(staging, path)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    while True:
        with open(path) as requests:
            for line in requests:
                reply, _, request = line.rstrip("\n").partition(" ")
                if os.fork() == 0:
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    try:
                        os.dup2(os.open(reply, os.O_WRONLY), 1)
                        name, _, args = request.partition(" ")
                        run(name, args)
                    finally:
                        sys.stdout.flush()
                        os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        run(sys.argv[1], sys.argv[2])
