/* Acquire loads and release stores of the io_uring ring indices, for mer_runtime.uring (loaded with ctypes).
 *
 * The kernel ABI (io_uring(7), liburing's io_uring_smp_load_acquire / io_uring_smp_store_release) asks for an
 * acquire load of the CQ tail before the CQEs are read, a release store of the CQ head after they are read, and a
 * release store of the SQ tail after the SQE is written. CPython's ctypes has no atomics, so these four lines do it
 * with the compiler's C11 builtins: correct on every architecture (on x86-64 they compile to plain moves). */
#include <stdint.h>

uint32_t mer_load_acquire_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

void mer_store_release_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
