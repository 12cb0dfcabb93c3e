# syntax=docker/dockerfile:1
#
# The cbtflow worker (and the starter CLI) for docker-compose.yml.
#
#   docker build -t cbtflow .
#
# Stages: build (Go + cgo over libnbd), nbdkit-vddk (nbdkit's VMware VDDK
# plugin, which Debian does not ship), runtime (Debian bookworm with
# qemu-utils, nbdkit and libnbd). VDDK itself is VMware's proprietary
# library: it is not in the image; the operator mounts it (see the README)
# and names it in the vCenter profile (vddk_libdir).

ARG GO_VERSION=1.26
ARG DEBIAN_RELEASE=bookworm
# nbdkit of Debian bookworm. The plugin is built from the same upstream
# release as the nbdkit binary the runtime installs, taken from the Debian
# archive with the SHA-256 that the signed nbdkit_1.32.5-1.dsc records.
ARG NBDKIT_VERSION=1.32.5
ARG NBDKIT_DEB_VERSION=1.32.5-1
ARG NBDKIT_TARBALL_URL=https://deb.debian.org/debian/pool/main/n/nbdkit/nbdkit_1.32.5.orig.tar.gz
ARG NBDKIT_TARBALL_SHA256=07921293f22bfaa121cff1ba3f13d75243f5cd4864abbb20aa9686ed5649dbf4

##### build: the worker and the CLI #####
FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnbd-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
# Only the sources: no bin/, no .cbtflow/ state from a checkout.
COPY activities/ activities/
COPY workflows/ workflows/
COPY internal/ internal/
COPY starter/ starter/
COPY worker/ worker/
RUN CGO_ENABLED=1 go build -trimpath -o /out/ ./worker ./starter

##### nbdkit-vddk: nbdkit's vddk plugin from source #####
# The plugin needs no VDDK to build: nbdkit carries its own declarations of
# the VDDK API and dlopens libvixDiskLib.so at run time from libdir=.
FROM debian:${DEBIAN_RELEASE} AS nbdkit-vddk
ARG NBDKIT_VERSION
ARG NBDKIT_TARBALL_URL
ARG NBDKIT_TARBALL_SHA256
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev make pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
RUN curl -fsSL -o nbdkit.tar.gz "$NBDKIT_TARBALL_URL" \
 && echo "$NBDKIT_TARBALL_SHA256  nbdkit.tar.gz" | sha256sum -c - \
 && tar xzf nbdkit.tar.gz \
 && cd "nbdkit-$NBDKIT_VERSION" \
 && ./configure --prefix=/usr --libdir="/usr/lib/$(gcc -dumpmachine)" --enable-vddk \
      --disable-perl --disable-python --disable-ocaml --disable-rust --disable-ruby \
      --disable-tcl --disable-lua --disable-golang --without-libvirt --without-libguestfs \
 && make -j"$(nproc)" \
 && test -f plugins/vddk/.libs/nbdkit-vddk-plugin.so \
 && install -D -m 0644 plugins/vddk/.libs/nbdkit-vddk-plugin.so /out/nbdkit-vddk-plugin.so

##### runtime #####
FROM debian:${DEBIAN_RELEASE} AS runtime
ARG NBDKIT_DEB_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libnbd0 qemu-utils "nbdkit=$NBDKIT_DEB_VERSION" \
 && rm -rf /var/lib/apt/lists/*
COPY --from=nbdkit-vddk /out/nbdkit-vddk-plugin.so /tmp/
# Install the plugin next to Debian's own, and check it links.
RUN plugindir="$(nbdkit --dump-config | sed -n 's/^plugindir=//p')" \
 && install -m 0644 /tmp/nbdkit-vddk-plugin.so "$plugindir/" \
 && rm /tmp/nbdkit-vddk-plugin.so \
 && ! ldd "$plugindir/nbdkit-vddk-plugin.so" | grep 'not found'
COPY --from=build /out/worker /out/starter /usr/local/bin/
RUN useradd --system --uid 10001 --home-dir /var/lib/cbtflow --create-home cbtflow \
 && install -d -o cbtflow -g cbtflow -m 0750 /var/lib/cbtflow/repository \
 && install -d -m 0755 /etc/cbtflow /opt/vmware-vix-disklib-distrib
USER cbtflow
WORKDIR /var/lib/cbtflow
ENV CBTFLOW_REPOSITORY=/var/lib/cbtflow/repository \
    CBTFLOW_VCENTERS=/etc/cbtflow/vcenters.json \
    CBTFLOW_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD curl -fsS -o /dev/null http://127.0.0.1:9464/metrics || exit 1
ENTRYPOINT ["/usr/local/bin/worker"]
