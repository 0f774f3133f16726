/* A stand-in libnccl for CPU tests and benches: host memory instead of GPU memory, fake
 * communicators and windows, and failures injected on demand through stand_in_set().
 * It implements only the symbols symm_rs resolves. Build:
 *   cc -shared -fPIC -O2 -o libnccl_stand_in.so stand_in_nccl.c
 * Add -DSTAND_IN_NO_WINDOWS for a library without the window symbols. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int ncclResult_t;
typedef void *ncclComm_t;
typedef void *ncclWindow_t;

enum { OK = 0, CUDA_ERROR = 1, INVALID_ARGUMENT = 4, INVALID_USAGE = 5 };

/* Knobs, all zero by default. */
static long version = 22809;       /* ncclGetVersion */
static long fail_alloc = 0;        /* non-zero: ncclMemAlloc fails */
static long null_alloc = 0;        /* non-zero: ncclMemAlloc "succeeds" with NULL */
static long null_window = 0;       /* non-zero: register succeeds with a NULL window */
static long fail_register_at = 0;  /* n > 0: the n-th register call from now fails */
static long fail_deregister = 0;   /* non-zero: deregister fails */
static long nranks = 2;
static long destroy_sleep_ms = 0;  /* ncclCommDestroy takes this long (a teardown that waits) */
static long symmetric_support = 1; /* what ncclCommQueryProperties reports */

/* Counters, read back with stand_in_get(). */
static long allocs, frees, registers, deregisters, live_windows;
/* Communicators and collectives: made, split, destroyed; launches and the last one's comm. */
static long comms_made, splits, comms_destroyed, comms_aborted, launches, last_comm, last_count;
static long property_queries, last_props_version;
static char last_error[256] = "";

int stand_in_set(const char *key, long value) {
  if (!strcmp(key, "version")) version = value;
  else if (!strcmp(key, "fail_alloc")) fail_alloc = value;
  else if (!strcmp(key, "null_alloc")) null_alloc = value;
  else if (!strcmp(key, "null_window")) null_window = value;
  else if (!strcmp(key, "fail_register_at")) fail_register_at = value;
  else if (!strcmp(key, "fail_deregister")) fail_deregister = value;
  else if (!strcmp(key, "nranks")) nranks = value;
  else if (!strcmp(key, "destroy_sleep_ms")) destroy_sleep_ms = value;
  else if (!strcmp(key, "symmetric_support")) symmetric_support = value;
  else return -1;
  return 0;
}

long stand_in_get(const char *key) {
  if (!strcmp(key, "allocs")) return allocs;
  if (!strcmp(key, "frees")) return frees;
  if (!strcmp(key, "registers")) return registers;
  if (!strcmp(key, "deregisters")) return deregisters;
  if (!strcmp(key, "live_windows")) return live_windows;
  if (!strcmp(key, "comms_made")) return comms_made;
  if (!strcmp(key, "splits")) return splits;
  if (!strcmp(key, "comms_destroyed")) return comms_destroyed;
  if (!strcmp(key, "comms_aborted")) return comms_aborted;
  if (!strcmp(key, "property_queries")) return property_queries;
  if (!strcmp(key, "last_props_version")) return last_props_version;
  if (!strcmp(key, "launches")) return launches;
  if (!strcmp(key, "last_comm")) return last_comm;
  if (!strcmp(key, "last_count")) return last_count;
  return -1;
}

ncclResult_t ncclGetVersion(int *v) { *v = (int)version; return OK; }

const char *ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case OK: return "no error";
    case CUDA_ERROR: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case INVALID_ARGUMENT: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case INVALID_USAGE: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    default: return "unknown result code";
  }
}

const char *ncclGetLastError(ncclComm_t comm) { (void)comm; return last_error; }

ncclResult_t ncclMemAlloc(void **ptr, size_t size) {
  if (fail_alloc) {
    /* Like the real one on OOM: an error code, and *ptr left as garbage. */
    *ptr = (void *)0xdeadbeef;
    strcpy(last_error, "stand-in: Cuda failure 2 'out of memory'");
    return CUDA_ERROR;
  }
  if (null_alloc) { *ptr = NULL; return OK; }
  void *p = NULL;
  if (posix_memalign(&p, 4096, size ? size : 1)) return CUDA_ERROR;
  memset(p, 0, size < 64 ? size : 64);
  *ptr = p;
  __atomic_add_fetch(&allocs, 1, __ATOMIC_RELAXED);
  return OK;
}

ncclResult_t ncclMemFree(void *ptr) {
  free(ptr);
  __atomic_add_fetch(&frees, 1, __ATOMIC_RELAXED);
  return OK;
}

#ifndef STAND_IN_NO_WINDOWS
ncclResult_t ncclCommWindowRegister(ncclComm_t comm, void *buff, size_t size, ncclWindow_t *win,
                                    int flags) {
  (void)flags;
  if (!comm || !buff || !size) return INVALID_ARGUMENT;
  if (fail_register_at > 0 && --fail_register_at == 0) {
    strcpy(last_error, "stand-in: injected registration failure");
    return INVALID_USAGE;
  }
  long n = __atomic_add_fetch(&registers, 1, __ATOMIC_RELAXED);
  *win = null_window ? NULL : (void *)(uintptr_t)(0x10000 + n);
  if (*win) __atomic_add_fetch(&live_windows, 1, __ATOMIC_RELAXED);
  return OK;
}

ncclResult_t ncclCommWindowDeregister(ncclComm_t comm, ncclWindow_t win) {
  if (!comm || !win) return INVALID_ARGUMENT;
  if (fail_deregister) {
    strcpy(last_error, "stand-in: injected deregistration failure");
    return INVALID_USAGE;
  }
  __atomic_add_fetch(&deregisters, 1, __ATOMIC_RELAXED);
  __atomic_sub_fetch(&live_windows, 1, __ATOMIC_RELAXED);
  return OK;
}
#endif

ncclResult_t ncclCommCuDevice(ncclComm_t comm, int *device) {
  if (!comm) return INVALID_ARGUMENT;
  *device = 0;
  return OK;
}

ncclResult_t ncclCommCount(ncclComm_t comm, int *count) {
  if (!comm) return INVALID_ARGUMENT;
  *count = (int)nranks;
  return OK;
}

ncclResult_t ncclCommUserRank(ncclComm_t comm, int *rank) {
  if (!comm) return INVALID_ARGUMENT;
  *rank = 0;
  return OK;
}

/* Communicators are small heap blocks; collectives only record that they were launched, on
 * which communicator and with what count (the buffers are never touched). */
typedef struct { char internal[128]; } ncclUniqueId;

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
  memset(id, 7, sizeof *id);
  return OK;
}

static ncclComm_t new_comm(void) {
  ncclComm_t c = calloc(1, 64);
  if (c) __atomic_add_fetch(&comms_made, 1, __ATOMIC_RELAXED);
  return c;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int n, ncclUniqueId id, int rank) {
  (void)id;
  if (n < 1 || rank < 0 || rank >= n) return INVALID_ARGUMENT;
  nranks = n;
  *comm = new_comm();
  return *comm ? OK : CUDA_ERROR;
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm,
                           void *config) {
  (void)color; (void)key; (void)config;
  if (!comm) return INVALID_ARGUMENT;
  *newcomm = new_comm();
  __atomic_add_fetch(&splits, 1, __ATOMIC_RELAXED);
  return *newcomm ? OK : CUDA_ERROR;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (!comm) return INVALID_ARGUMENT;
  if (destroy_sleep_ms > 0) {
    struct timespec t = {destroy_sleep_ms / 1000, (destroy_sleep_ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
  }
  free(comm);
  __atomic_add_fetch(&comms_destroyed, 1, __ATOMIC_RELAXED);
  return OK;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (!comm) return INVALID_ARGUMENT;
  free(comm);
  __atomic_add_fetch(&comms_aborted, 1, __ATOMIC_RELAXED);
  return OK;
}

/* The head of ncclCommProperties_t: NCCL checks magic and version and fills the fields. */
typedef struct {
  size_t size;
  unsigned int magic, version;
  int rank, nRanks, cudaDev, nvmlDev;
  _Bool deviceApiSupport;
} stand_in_props;

ncclResult_t ncclCommQueryProperties(ncclComm_t comm, stand_in_props *props) {
  if (!comm || !props) return INVALID_ARGUMENT;
  if (props->magic != 0xcafebeef || props->size < sizeof *props) return INVALID_USAGE;
  __atomic_add_fetch(&property_queries, 1, __ATOMIC_RELAXED);
  last_props_version = props->version;
  props->rank = 0;
  props->nRanks = (int)nranks;
  props->deviceApiSupport = symmetric_support != 0;
  return OK;
}

static ncclResult_t launched(ncclComm_t comm, size_t count) {
  if (!comm) return INVALID_ARGUMENT;
  __atomic_add_fetch(&launches, 1, __ATOMIC_RELAXED);
  last_comm = (long)(uintptr_t)comm;
  last_count = (long)count;
  return OK;
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, int dtype, ncclComm_t comm,
                           void *stream) {
  (void)send; (void)recv; (void)dtype; (void)stream;
  return launched(comm, count);
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, int dtype, int op,
                           ncclComm_t comm, void *stream) {
  (void)send; (void)recv; (void)dtype; (void)op; (void)stream;
  return launched(comm, count);
}

ncclResult_t ncclReduceScatter(const void *send, void *recv, size_t count, int dtype, int op,
                               ncclComm_t comm, void *stream) {
  (void)send; (void)recv; (void)dtype; (void)op; (void)stream;
  return launched(comm, count);
}

ncclResult_t ncclGroupStart(void) { return OK; }
ncclResult_t ncclGroupEnd(void) { return OK; }
