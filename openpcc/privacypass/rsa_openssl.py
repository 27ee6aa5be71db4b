"""RSA's raw private operation (RSASP1, ``m^d mod n``) on the system's OpenSSL 3 libcrypto.

Why: the issuer's BlindSign is one RSA private operation per token, and GMP's
constant-time ``powmod_sec`` reaches 0.3-0.55 of OpenSSL's own RSA sign on the same
core; libcrypto's private operation runs at OpenSSL's speed and, called through ctypes,
releases the GIL, so several threads sign on several cores. ``cryptography`` bundles an
OpenSSL too, but exposes no raw (unpadded) RSA private operation, hence the system one.

What OpenSSL does for us (``EVP_PKEY_sign`` with ``RSA_NO_PADDING``): base blinding with
a fresh random factor, constant-time CRT exponentiation, and a check of the result
(recomputed without CRT on a mismatch, so a fault cannot leak a factor of ``n``).
``blindrsa.blind_sign`` still checks ``s^e == m`` itself.

Loaded once per process; ``OPENPCC_LIBCRYPTO`` names the library file (default: the
one the dynamic linker finds for ``crypto``). Not OpenSSL 3 or not found:
``OpenSSLUnavailableError``, and ``blindrsa`` falls back to gmpy2.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from functools import cache
from typing import Any

from openpcc.errors import DecodeError, OpenPCCError

__all__ = [
    "LIBCRYPTO_ENV",
    "NativeRSAKey",
    "OpenSSLError",
    "OpenSSLUnavailableError",
    "available",
    "generation",
    "libcrypto",
    "reset",
    "unavailable_reason",
]

LIBCRYPTO_ENV = "OPENPCC_LIBCRYPTO"
_RSA_NO_PADDING = 3
_OPENSSL_3 = 0x30000000


_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


# A forked child must not reuse its parent's keys: both would continue the same
# blinding sequence. Keys record the generation they were made in (see ``generation``).
os.register_at_fork(after_in_child=_forked)


def generation() -> int:
    """Bumped in every forked child; a key from an older generation must be remade."""
    return _generation


class OpenSSLError(OpenPCCError):
    """libcrypto refused a key or failed an operation (its error queue in the text)."""


class OpenSSLUnavailableError(OpenSSLError):
    """No OpenSSL 3 libcrypto could be loaded."""


def libcrypto() -> Any:
    """The loaded library with the prototypes we call; raises OpenSSLUnavailableError.

    Loaded once per process; a failure is remembered too (finding the library runs
    ``ldconfig``, too slow to retry per token)."""
    lib, why = _load()
    if lib is None:
        raise OpenSSLUnavailableError(why)
    return lib


@cache
def _load() -> tuple[Any, str]:
    path = os.environ.get(LIBCRYPTO_ENV) or ctypes.util.find_library("crypto") or "libcrypto.so.3"
    try:
        lib = ctypes.CDLL(path)  # CDLL (not PyDLL): every call releases the GIL
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        lib.OpenSSL_version_num.argtypes = []
        version = lib.OpenSSL_version_num()
        if version < _OPENSSL_3:
            return None, f"{path} is OpenSSL {version:#x}, not 3.x"
        vp, size_t = ctypes.c_void_p, ctypes.c_size_t
        protos = {
            "d2i_AutoPrivateKey": (vp, [vp, ctypes.POINTER(ctypes.c_void_p), ctypes.c_long]),
            "EVP_PKEY_free": (None, [vp]),
            "EVP_PKEY_get_bits": (ctypes.c_int, [vp]),
            "EVP_PKEY_CTX_new": (vp, [vp, vp]),
            "EVP_PKEY_CTX_free": (None, [vp]),
            "EVP_PKEY_sign_init": (ctypes.c_int, [vp]),
            "EVP_PKEY_CTX_set_rsa_padding": (ctypes.c_int, [vp, ctypes.c_int]),
            "EVP_PKEY_sign": (
                ctypes.c_int,
                [vp, ctypes.c_char_p, ctypes.POINTER(size_t), ctypes.c_char_p, size_t],
            ),
            "ERR_get_error": (ctypes.c_ulong, []),
            "ERR_error_string_n": (None, [ctypes.c_ulong, ctypes.c_char_p, size_t]),
        }
        for name, (restype, argtypes) in protos.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as exc:
        return None, f"no OpenSSL 3 libcrypto ({path}): {exc}"
    return lib, ""


def unavailable_reason() -> str:
    """Why libcrypto did not load ("" when it did)."""
    return _load()[1]


def reset() -> None:
    """Forget the loaded library (tests: load again under another OPENPCC_LIBCRYPTO)."""
    _load.cache_clear()


def available() -> bool:
    try:
        libcrypto()
    except OpenSSLUnavailableError:
        return False
    return True


def _error(lib: Any, what: str) -> OpenSSLError:
    """OpenSSL's queued reasons (this thread's queue, which is then empty)."""
    reasons = []
    buf = ctypes.create_string_buffer(256)
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buf, len(buf))
        reasons.append(buf.value.decode(errors="replace"))
    return OpenSSLError(f"{what}: {'; '.join(reasons) or 'no reason given'}")


class _Ctx:
    """One thread's signing context (prepared once: 5 µs of setup saved per token)."""

    __slots__ = ("ctx", "lib")

    def __init__(self, lib: Any, pkey: int) -> None:
        self.lib = lib
        self.ctx = lib.EVP_PKEY_CTX_new(pkey, None)  # holds its own reference to pkey
        if not self.ctx:
            raise _error(lib, "EVP_PKEY_CTX_new")
        if (
            lib.EVP_PKEY_sign_init(self.ctx) != 1
            or lib.EVP_PKEY_CTX_set_rsa_padding(self.ctx, _RSA_NO_PADDING) != 1
        ):
            err = _error(lib, "EVP_PKEY_sign_init (RSA, no padding)")
            self.free()
            raise err

    def free(self) -> None:
        ctx, self.ctx = self.ctx, None
        if ctx:
            self.lib.EVP_PKEY_CTX_free(ctx)

    def __del__(self) -> None:  # the thread ended, or its key was dropped
        self.free()


class NativeRSAKey:
    """An RSA private key held by libcrypto, from its DER (PKCS#8 or PKCS#1).

    Freed when dropped (``close`` frees it at once); each thread that signs gets its own
    context, freed when the thread ends or the key is dropped."""

    def __init__(self, der: bytes | bytearray, modulus_bits: int) -> None:
        lib = libcrypto()
        self._lib = lib
        self._len = (modulus_bits + 7) // 8
        buf = ctypes.create_string_buffer(bytes(der), len(der))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        self._pkey = lib.d2i_AutoPrivateKey(None, ctypes.byref(ptr), len(der))
        ctypes.memset(buf, 0, len(der))
        if not self._pkey:
            raise _error(lib, "d2i_AutoPrivateKey")
        if lib.EVP_PKEY_get_bits(self._pkey) != modulus_bits:
            self.close()
            raise OpenSSLError("libcrypto loaded a key of another size")
        self._local = threading.local()
        self.generation = _generation

    def private_op(self, m: bytes) -> bytes:
        """``m^d mod n`` for a ``k``-byte ``m`` below ``n`` (the caller checked; OpenSSL
        checks again and refuses with OpenSSLError)."""
        if len(m) != self._len:
            raise DecodeError(f"RSA input must be {self._len} bytes")
        if not self._pkey:
            raise OpenSSLError("key already closed")
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = _Ctx(self._lib, self._pkey)
        out = ctypes.create_string_buffer(self._len)
        out_len = ctypes.c_size_t(self._len)
        if self._lib.EVP_PKEY_sign(ctx.ctx, out, ctypes.byref(out_len), bytes(m), self._len) != 1:
            raise _error(self._lib, "RSA private operation")
        if out_len.value != self._len:
            raise OpenSSLError("RSA private operation returned a short result")
        return out.raw

    def close(self) -> None:
        """Free the key now (contexts of other live threads keep their own reference)."""
        ctx = getattr(self._local, "ctx", None) if hasattr(self, "_local") else None
        if ctx is not None:
            ctx.free()
        pkey, self._pkey = self._pkey, None
        if pkey:
            self._lib.EVP_PKEY_free(pkey)

    def __del__(self) -> None:
        if getattr(self, "_pkey", None):
            self.close()
