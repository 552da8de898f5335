/*
 * reconciler-init: PID 1 inside every reconciler microVM and unikernel.
 *
 * Where it sits: the builders put this static binary at /init of the initramfs (and at
 * /sbin/reconciler-init of a microVM's root disk). The runtime boots the kernel; the kernel runs
 * this; this runs the workload and reports on the console with machine-readable markers that the
 * host reads (see guest/README.md):
 *
 *   @@reconciler {"event":"booted","t":0.912}
 *   @@reconciler {"event":"workload-started","pid":57,"t":0.950}
 *   @@reconciler {"event":"workload-exited","code":0,"t":3.001}
 *   @@reconciler {"event":"poweroff","t":3.010}
 *
 * A stop request (SIGTERM from the process runtime, Ctrl-Alt-Del turned into SIGINT, the ACPI
 * power button that QEMU's system_powerdown presses, read from its evdev device) stops the
 * workload at once: SIGTERM, SIGKILL after the grace period, then a "stopped" marker, sync and
 * power off, so the host sees the VM end instead of waiting out its own timeout.
 *
 * Configuration comes from two files and never from the kernel command line:
 *   - /etc/reconciler/init.conf, key=value lines baked into the artifact (what to run, which
 *     modules to load, which disk is the root);
 *   - /etc/reconciler/vm.conf, the per-VM configuration the runtime writes at every start
 *     (hostname, address, env, args, restart policy) into a small cpio archive appended to the
 *     artifact's initramfs. Its records are length-prefixed, so any value (spaces, quotes,
 *     newlines, non-ASCII, '=') arrives byte for byte; a malformed file is refused as a whole and
 *     the workload does not start. Its `volume` records name disks that are mounted (found by
 *     virtio serial, else by ext4 label) before the workload starts; one that cannot be mounted
 *     stops the boot, so a workload never writes its data to the wrong disk.
 *
 * Run as an ordinary process (not PID 1) it is in host mode: no mounts, modules, network or
 * power-off, just the workload, the markers, signal forwarding and the exit code. The tests and
 * the process runtime drive that mode: `reconciler-init --config FILE [--vm-config FILE]`.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_CONFIG "/etc/reconciler/init.conf"
#define DEFAULT_VM_CONFIG "/etc/reconciler/vm.conf"
/* The per-VM configuration: a magic line, then records "<key> <length>\n<value>\n", then
 * "end 0\n\n". The cap matches the runtime's (MAX_CONFIG_BYTES); larger is refused, not cut. */
#define VM_CONFIG_MAGIC "reconciler-vm-config 1\n"
#define VM_CONFIG_MAX (1024 * 1024)

/* A growable list of strings: nothing from a configuration is ever dropped for want of room. */
struct list {
    char **items;
    size_t count;
    size_t room;
};

struct config {
    char *exec;
    char *workdir;
    char *hostname;
    char *ip;
    char *gateway;
    char *iface;
    char *root;
    char *rootfstype;
    char *restart;
    int grace;
    int poweroff;
    int boot_only;
    int snapshot_template; /* wait for vm.conf on the console: see await_snapshot_config */
    char *mac;             /* the interface's address, set after a snapshot restore */
    char *realtime;        /* "<seconds>.<nanoseconds>": the host's clock at a restore */
    char *entropy;         /* hex: fresh randomness for the kernel at a restore */
    struct list args;
    struct list env;
    struct list modules;
    struct list volumes; /* "<serial> <fstype> <mount path>" */
    struct list secret_files; /* "<path under /run/secrets/> <content>" */
};

static int pid1;
/* The signal that asked for a stop (SIGTERM, SIGINT or SIGPWR), 0 while none did. */
static volatile sig_atomic_t stop_requested;

/* The per-VM configuration, read once (before a root switch hides the initramfs). */
static char *vm_blob;
static size_t vm_blob_len;
static int vm_config_bad;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* JSON string escaping for marker messages. */
static void put_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void marker(const char *event, const char *extra_fmt, ...) {
    printf("@@reconciler {\"event\":\"%s\"", event);
    if (extra_fmt) {
        va_list ap;
        putchar(',');
        va_start(ap, extra_fmt);
        vprintf(extra_fmt, ap);
        va_end(ap);
    }
    printf(",\"t\":%.3f}\n", now());
    fflush(stdout);
}

static void error_marker(const char *fmt, ...) {
    char message[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    printf("@@reconciler {\"event\":\"error\",\"message\":");
    put_json_string(message);
    printf(",\"t\":%.3f}\n", now());
    fflush(stdout);
}

static void *xrealloc(void *p, size_t size) {
    void *q = realloc(p, size);
    if (!q) {
        error_marker("out of memory");
        _exit(125);
    }
    return q;
}

static char *xstrdup(const char *s) {
    char *copy = strdup(s);
    if (!copy) {
        error_marker("out of memory");
        _exit(125);
    }
    return copy;
}

static void set_scalar(char **slot, const char *value) {
    free(*slot);
    *slot = xstrdup(value);
}

static void add_item(struct list *list, const char *value) {
    if (list->count + 1 >= list->room) {
        list->room = list->room ? list->room * 2 : 16;
        list->items = xrealloc(list->items, list->room * sizeof *list->items);
    }
    list->items[list->count++] = xstrdup(value);
    list->items[list->count] = NULL;
}

/* Apply one key=value of init.conf; repeatable keys append, scalar keys replace. */
static void apply(struct config *c, const char *key, const char *value) {
    if (!strcmp(key, "exec")) set_scalar(&c->exec, value);
    else if (!strcmp(key, "workdir")) set_scalar(&c->workdir, value);
    else if (!strcmp(key, "hostname")) set_scalar(&c->hostname, value);
    else if (!strcmp(key, "ip")) set_scalar(&c->ip, value);
    else if (!strcmp(key, "gateway")) set_scalar(&c->gateway, value);
    else if (!strcmp(key, "iface")) set_scalar(&c->iface, value);
    else if (!strcmp(key, "root")) set_scalar(&c->root, value);
    else if (!strcmp(key, "rootfstype")) set_scalar(&c->rootfstype, value);
    else if (!strcmp(key, "restart")) set_scalar(&c->restart, value);
    else if (!strcmp(key, "grace")) c->grace = atoi(value);
    else if (!strcmp(key, "poweroff")) c->poweroff = atoi(value);
    else if (!strcmp(key, "arg")) add_item(&c->args, value);
    else if (!strcmp(key, "env")) add_item(&c->env, value);
    else if (!strcmp(key, "module")) add_item(&c->modules, value);
    else error_marker("unknown config key %s", key);
}

static int read_config_file(struct config *c, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char *line = NULL;
    size_t size = 0;
    while (getline(&line, &size, f) >= 0) {
        line[strcspn(line, "\r\n")] = 0;
        char *start = line;
        while (*start == ' ' || *start == '\t') start++;
        if (!*start || *start == '#') continue;
        char *eq = strchr(start, '=');
        if (!eq) {
            error_marker("%s: line without '=': %s", path, start);
            continue;
        }
        *eq = 0;
        apply(c, start, eq + 1);
    }
    free(line);
    fclose(f);
    return 0;
}

/* Read a whole file of at most `max` bytes; -1 with errno set, or -2 when it is larger. */
static int read_whole(const char *path, size_t max, char **data, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t used = 0, room = 4096;
    char *buffer = xrealloc(NULL, room + 1);
    for (;;) {
        if (used == room) {
            if (room > max) break;
            room *= 2;
            buffer = xrealloc(buffer, room + 1);
        }
        ssize_t n = read(fd, buffer + used, room - used);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int err = errno;
            close(fd);
            free(buffer);
            errno = err;
            return -1;
        }
        if (n == 0) break;
        used += (size_t)n;
    }
    close(fd);
    if (used > max) {
        free(buffer);
        return -2;
    }
    buffer[used] = 0;
    *data = buffer;
    *len = used;
    return 0;
}

static int valid_env(const char *value) {
    const char *eq = strchr(value, '=');
    if (!eq || eq == value) return 0;
    if (!(value[0] == '_' || (value[0] >= 'A' && value[0] <= 'Z') ||
          (value[0] >= 'a' && value[0] <= 'z')))
        return 0;
    for (const char *p = value + 1; p < eq; p++)
        if (!(*p == '_' || (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
              (*p >= '0' && *p <= '9')))
            return 0;
    return 1;
}

/* A volume record: "<serial> ext4 <absolute path>", serial 1-16 of [a-z0-9-], the path made of
 * [A-Za-z0-9._-] names (the host checks the same and refuses the reserved places). */
static int valid_volume(const char *value) {
    const char *space = strchr(value, ' ');
    if (!space || space == value || space - value > 16) return 0;
    for (const char *p = value; p < space; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '-')) return 0;
    if (strncmp(space + 1, "ext4 /", 6)) return 0;
    const char *path = space + 6;
    if (!path[1]) return 0;
    for (const char *p = path; *p; p++) {
        int name = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                   (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-';
        if (!name && !(*p == '/' && p[1] && p[1] != '/')) return 0;
        if (*p == '/' && p[1] == '.' && (!p[2] || p[2] == '/' || (p[2] == '.' && (!p[3] || p[3] == '/'))))
            return 0;
    }
    return 1;
}

/* A secret-file record: "<path> <content>", the path under /run/secrets/ made of names of
 * [A-Za-z0-9._-] that do not start with '.' (so no "." or ".."), as the host checks too. */
#define SECRET_DIR "/run/secrets"
static int valid_secret_file(const char *value) {
    size_t prefix = strlen(SECRET_DIR "/");
    size_t end = strcspn(value, " ");
    if (!value[end] || end <= prefix || end > 200 || strncmp(value, SECRET_DIR "/", prefix))
        return 0;
    for (size_t i = prefix; i < end; i++) {
        char ch = value[i];
        int name = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                   (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        int starts = i == prefix || value[i - 1] == '/';
        if (starts && (ch == '.' || ch == '/')) return 0;
        if (!name && ch != '/') return 0;
        if (ch == '/' && i + 1 == end) return 0;
    }
    return 1;
}

/* "52:54:00:12:34:56": six lower-case hex pairs, a unicast address. */
static int valid_mac(const char *value) {
    if (strlen(value) != 17) return 0;
    for (int i = 0; i < 17; i++) {
        char ch = value[i];
        int hex = (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f');
        if (i % 3 == 2 ? ch != ':' : !hex) return 0;
    }
    return !(strtol(value, NULL, 16) & 1);
}

/* Check the per-VM configuration and, with `c`, apply it. Returns 0, or -1 with the reason in
 * `why`. Only per-VM keys are accepted: what runs, its modules and root disk come from the
 * artifact alone. Every length is checked against what is left of the buffer. */
static int parse_vm_config(struct config *c, const char *blob, size_t len, char *why,
                           size_t why_size) {
    size_t magic = strlen(VM_CONFIG_MAGIC);
    if (len < magic || memcmp(blob, VM_CONFIG_MAGIC, magic)) {
        snprintf(why, why_size, "not a reconciler-vm-config 1 file");
        return -1;
    }
    size_t at = magic;
    for (;;) {
        char key[32];
        size_t k = 0;
        while (at < len && blob[at] != ' ' && k < sizeof key - 1) {
            char ch = blob[at];
            if (!((ch >= 'a' && ch <= 'z') || ch == '-')) {
                snprintf(why, why_size, "bad key at byte %zu", at);
                return -1;
            }
            key[k++] = ch;
            at++;
        }
        key[k] = 0;
        if (at >= len || blob[at] != ' ' || k == 0) {
            snprintf(why, why_size, "bad record header at byte %zu", at);
            return -1;
        }
        at++;
        size_t value_len = 0;
        int digits = 0;
        while (at < len && blob[at] >= '0' && blob[at] <= '9' && digits < 8) {
            value_len = value_len * 10 + (size_t)(blob[at] - '0');
            at++;
            digits++;
        }
        if (!digits || at >= len || blob[at] != '\n') {
            snprintf(why, why_size, "bad length of %s at byte %zu", key, at);
            return -1;
        }
        at++;
        if (!strcmp(key, "end")) {
            if (value_len != 0 || at + 1 != len || blob[at] != '\n') {
                snprintf(why, why_size, "data after the end record");
                return -1;
            }
            return 0;
        }
        if (value_len > len - at || len - at - value_len < 1 || blob[at + value_len] != '\n') {
            snprintf(why, why_size, "record %s is truncated", key);
            return -1;
        }
        const char *value = blob + at;
        if (memchr(value, 0, value_len)) {
            snprintf(why, why_size, "record %s holds a NUL byte", key);
            return -1;
        }
        char *copy = xrealloc(NULL, value_len + 1);
        memcpy(copy, value, value_len);
        copy[value_len] = 0;
        at += value_len + 1;
        int ok = 1;
        if (!strcmp(key, "env")) {
            ok = valid_env(copy);
            if (ok && c) add_item(&c->env, copy);
        } else if (!strcmp(key, "arg")) {
            if (c) add_item(&c->args, copy);
        } else if (!strcmp(key, "hostname") || !strcmp(key, "ip") || !strcmp(key, "gateway") ||
                   !strcmp(key, "restart")) {
            if (c) apply(c, key, copy);
        } else if (!strcmp(key, "boot-only")) {
            if (c) c->boot_only = !strcmp(copy, "1");
        } else if (!strcmp(key, "snapshot-template")) {
            if (c) c->snapshot_template = !strcmp(copy, "1");
        } else if (!strcmp(key, "mac")) {
            ok = valid_mac(copy);
            if (ok && c) set_scalar(&c->mac, copy);
        } else if (!strcmp(key, "realtime")) {
            ok = strspn(copy, "0123456789.") == value_len && value_len < 32;
            if (ok && c) set_scalar(&c->realtime, copy);
        } else if (!strcmp(key, "entropy")) {
            ok = strspn(copy, "0123456789abcdef") == value_len && value_len % 2 == 0 &&
                 value_len <= 1024;
            if (ok && c) set_scalar(&c->entropy, copy);
        } else if (!strcmp(key, "volume")) {
            ok = valid_volume(copy);
            if (ok && c) add_item(&c->volumes, copy);
        } else if (!strcmp(key, "secret-file")) {
            ok = valid_secret_file(copy);
            if (ok && c) add_item(&c->secret_files, copy);
        } else {
            snprintf(why, why_size, "unknown key %s", key);
            free(copy);
            return -1;
        }
        free(copy);
        if (!ok) {
            snprintf(why, why_size, "record %s is not %s", key,
                     !strcmp(key, "volume")        ? "<serial> ext4 <path>"
                     : !strcmp(key, "secret-file") ? "<path under " SECRET_DIR "/> <content>"
                     : !strcmp(key, "mac")         ? "a MAC address xx:xx:xx:xx:xx:xx"
                     : !strcmp(key, "realtime")    ? "<seconds>.<nanoseconds>"
                     : !strcmp(key, "entropy")     ? "at most 512 bytes in lower-case hex"
                                                   : "NAME=value");
            return -1;
        }
    }
}

/* Read the per-VM configuration once. A missing file means no per-VM data (a test boot, the
 * KVM canary); anything unreadable or malformed stops the boot before the workload runs. */
static void load_vm_config(const char *path, int required) {
    char why[160];
    int got = read_whole(path, VM_CONFIG_MAX, &vm_blob, &vm_blob_len);
    if (got == -1 && errno == ENOENT && !required) return;
    if (got == -1) {
        error_marker("cannot read the VM configuration %s: %s", path, strerror(errno));
        vm_config_bad = 1;
        return;
    }
    if (got == -2) {
        error_marker("the VM configuration %s is larger than %d bytes", path, VM_CONFIG_MAX);
        vm_config_bad = 1;
        return;
    }
    if (parse_vm_config(NULL, vm_blob, vm_blob_len, why, sizeof why) < 0) {
        error_marker("the VM configuration %s is malformed: %s", path, why);
        vm_config_bad = 1;
        free(vm_blob);
        vm_blob = NULL;
        return;
    }
    /* Inside a VM nothing else needs the file once it is in memory. */
    if (pid1) unlink(path);
}

static void load_config(struct config *c, const char *file) {
    memset(c, 0, sizeof *c);
    c->grace = 10;
    c->poweroff = 1;
    if (read_config_file(c, file) < 0)
        error_marker("cannot read %s: %s", file, strerror(errno));
    if (vm_blob) {
        char why[160];
        parse_vm_config(c, vm_blob, vm_blob_len, why, sizeof why); /* checked when read */
    }
    if (!c->iface) c->iface = xstrdup("eth0");
    if (!c->restart) c->restart = xstrdup("never");
    if (!c->rootfstype) c->rootfstype = xstrdup("ext4");
}

/* Every VM restored from one snapshot starts with the template's memory: the same kernel random
 * state and a wall clock stopped when the template was saved. The host sends fresh randomness
 * (credited, then the kernel's generator is reseeded from it, so no two VMs share a stream) and
 * its own time with each restored VM's configuration. */
/* <linux/random.h>'s, written out: musl's headers do not carry the kernel's. */
struct entropy_pool {
    int entropy_count; /* bits */
    int buf_size;      /* bytes */
    unsigned char buf[512];
};
#define RNDADDENTROPY_IOCTL _IOW('R', 0x03, int[2])
#define RNDRESEEDCRNG_IOCTL _IO('R', 0x07)

static void renew_after_restore(struct config *c) {
    if (c->entropy) {
        struct entropy_pool pool;
        size_t bytes = strlen(c->entropy) / 2; /* at most 512: checked when read */
        for (size_t i = 0; i < bytes; i++) {
            char pair[3] = {c->entropy[2 * i], c->entropy[2 * i + 1], 0};
            pool.buf[i] = (unsigned char)strtoul(pair, NULL, 16);
        }
        pool.entropy_count = (int)(bytes * 8);
        pool.buf_size = (int)bytes;
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ioctl(fd, RNDADDENTROPY_IOCTL, &pool) < 0 ||
            ioctl(fd, RNDRESEEDCRNG_IOCTL) < 0)
            error_marker("reseeding the kernel's random generator: %s", strerror(errno));
        if (fd >= 0) close(fd);
        memset(&pool, 0, sizeof pool);
    }
    if (c->realtime) {
        struct timespec ts = {0, 0};
        char *dot = strchr(c->realtime, '.');
        ts.tv_sec = (time_t)strtoll(c->realtime, NULL, 10);
        if (dot) ts.tv_nsec = strtol(dot + 1, NULL, 10) % 1000000000L;
        if (clock_settime(CLOCK_REALTIME, &ts) < 0)
            error_marker("setting the clock: %s", strerror(errno));
    }
}

/* Snapshot-template mode (vm.conf holds `snapshot-template 1` and nothing per-VM): the runtime
 * boots one template VM per artifact and machine shape, waits for the `snapshot-ready` marker and
 * saves its memory; every VM of that artifact is then restored from the file and sent its own
 * vm.conf on the console as "<decimal length>\n<bytes>". So the snapshot holds no per-VM value
 * (no env, secret or address), and each restored VM still gets its configuration before the
 * network, volumes, secrets and workload are set up. The console is made raw first (no echo, no
 * line editing, every byte as sent). Returns 0, or -1 after an error marker. */
static int await_snapshot_config(struct config *c, const char *config_path) {
    struct termios raw;
    if (tcgetattr(0, &raw) == 0) {
        cfmakeraw(&raw);
        raw.c_cc[VMIN] = 1;
        raw.c_cc[VTIME] = 0;
        tcsetattr(0, TCSANOW, &raw);
    }
    marker("snapshot-ready", NULL);
    size_t len = 0;
    int digits = 0;
    for (;;) {
        char ch;
        if (read(0, &ch, 1) != 1) {
            if (errno == EINTR) continue;
            error_marker("reading the VM configuration from the console: %s", strerror(errno));
            return -1;
        }
        if (ch == '\n' && digits) break;
        if (ch < '0' || ch > '9' || ++digits > 8) {
            error_marker("the VM configuration on the console has no length line");
            return -1;
        }
        len = len * 10 + (size_t)(ch - '0');
    }
    if (len > VM_CONFIG_MAX) {
        error_marker("the VM configuration is larger than %d bytes", VM_CONFIG_MAX);
        return -1;
    }
    char *blob = xrealloc(NULL, len ? len : 1);
    for (size_t got = 0; got < len;) {
        ssize_t n = read(0, blob + got, len - got);
        if (n <= 0 && errno != EINTR) {
            error_marker("reading the VM configuration from the console: %s", strerror(errno));
            return -1;
        }
        if (n > 0) got += (size_t)n;
    }
    char why[160];
    if (parse_vm_config(NULL, blob, len, why, sizeof why) < 0) {
        error_marker("the VM configuration from the console is malformed: %s", why);
        return -1;
    }
    free(vm_blob);
    vm_blob = blob;
    vm_blob_len = len;
    load_config(c, config_path);
    if (c->snapshot_template) {
        error_marker("a restored VM's configuration asks for a snapshot template again");
        return -1;
    }
    renew_after_restore(c);
    return 0;
}

/* ------------------------------------------------------------------ PID 1 duties -- */

static void mount_or_report(const char *src, const char *dst, const char *type, unsigned long flags,
                            const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY)
        error_marker("mount %s on %s: %s", type, dst, strerror(errno));
}

static void mount_basics(void) {
    mount_or_report("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    mount_or_report("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_report("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_report("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mkdir("/dev/pts", 0755);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, NULL);
}

/* The kernel may start us without a console when the initramfs has no /dev/console. */
static void ensure_console(void) {
    if (fcntl(1, F_GETFD) != -1) return;
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0) return;
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    if (fd > 2) close(fd);
}

static void load_modules(struct config *c) {
    for (size_t i = 0; i < c->modules.count; i++) {
        int fd = open(c->modules.items[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            error_marker("module %s: %s", c->modules.items[i], strerror(errno));
            continue;
        }
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
            error_marker("loading module %s: %s", c->modules.items[i], strerror(errno));
        close(fd);
    }
}

/* Mount the root disk and make it / (what switch_root does, without deleting the initramfs:
 * it is small and freed memory is not worth the code). */
static int switch_root(struct config *c) {
    const char *target = "/newroot";
    mkdir(target, 0755);
    int mounted = -1;
    /* The disk may appear a moment after its driver loaded. */
    for (int attempt = 0; attempt < 100 && mounted < 0; attempt++) {
        mounted = mount(c->root, target, c->rootfstype, 0, NULL);
        if (mounted < 0) usleep(20000);
    }
    if (mounted < 0) {
        error_marker("mount root %s (%s): %s", c->root, c->rootfstype, strerror(errno));
        return -1;
    }
    const char *moves[] = {"/dev", "/proc", "/sys", "/tmp"};
    for (size_t i = 0; i < sizeof moves / sizeof *moves; i++) {
        char dst[64];
        snprintf(dst, sizeof dst, "%s%s", target, moves[i]);
        mkdir(dst, 0755);
        if (mount(moves[i], dst, NULL, MS_MOVE, NULL) < 0)
            error_marker("move %s: %s", moves[i], strerror(errno));
    }
    if (chdir(target) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
        chdir("/") < 0) {
        error_marker("switch to root %s: %s", c->root, strerror(errno));
        return -1;
    }
    return 0;
}

/* Read a small sysfs attribute without its trailing newline; "" when absent. */
static void read_attribute(const char *path, char *out, size_t size) {
    out[0] = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, out, size - 1);
    close(fd);
    if (n < 0) n = 0;
    out[n] = 0;
    out[strcspn(out, "\n")] = 0;
}

/* The ext4 label of /dev/<name> ("" when it is no ext4): the way to find a volume on a VMM
 * that cannot set a virtio serial (Firecracker). */
static void read_ext4_label(const char *name, char *out, size_t size) {
    char dev[300];
    unsigned char super[136];
    out[0] = 0;
    snprintf(dev, sizeof dev, "/dev/%s", name);
    int fd = open(dev, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = pread(fd, super, sizeof super, 1024);
    close(fd);
    if (n != (ssize_t)sizeof super || super[56] != 0x53 || super[57] != 0xEF) return;
    size_t len = strnlen((const char *)super + 120, 16);
    if (len >= size) return;
    memcpy(out, super + 120, len);
    out[len] = 0;
}

/* The /dev/vdX whose serial (or else ext4 label) is `serial`, never the disk that holds /. */
static int find_volume(const char *serial, char *device, size_t size) {
    struct stat root;
    if (stat("/", &root) < 0) return -1;
    DIR *dir = opendir("/sys/block");
    if (!dir) return -1;
    int found = -1;
    struct dirent *entry;
    while (found < 0 && (entry = readdir(dir))) {
        if (strncmp(entry->d_name, "vd", 2)) continue;
        char path[320], value[64];
        unsigned major_id, minor_id;
        snprintf(path, sizeof path, "/sys/block/%s/dev", entry->d_name);
        read_attribute(path, value, sizeof value);
        if (sscanf(value, "%u:%u", &major_id, &minor_id) == 2 &&
            makedev(major_id, minor_id) == root.st_dev)
            continue;
        snprintf(path, sizeof path, "/sys/block/%s/serial", entry->d_name);
        read_attribute(path, value, sizeof value);
        if (!value[0]) read_ext4_label(entry->d_name, value, sizeof value);
        if (!strcmp(value, serial)) {
            snprintf(device, size, "/dev/%s", entry->d_name);
            found = 0;
        }
    }
    closedir(dir);
    return found;
}

static void make_dirs(const char *path) {
    char buffer[512];
    snprintf(buffer, sizeof buffer, "%s", path);
    for (char *p = buffer + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        mkdir(buffer, 0755);
        *p = '/';
    }
    mkdir(buffer, 0755);
}

/* Mount every volume before the workload starts; -1 (after an error marker) when one cannot
 * be, since the workload would otherwise write its data to the root disk and lose it. */
static int mount_volumes(struct config *c) {
    for (size_t i = 0; i < c->volumes.count; i++) {
        char record[512];
        snprintf(record, sizeof record, "%s", c->volumes.items[i]);
        char *serial = record;
        char *fstype = strchr(serial, ' ');
        *fstype++ = 0;
        char *target = strchr(fstype, ' ');
        *target++ = 0;
        char device[300];
        int found = -1;
        /* The disk may appear a moment after virtio_blk loaded. */
        for (int attempt = 0; attempt < 150 && found < 0; attempt++) {
            found = find_volume(serial, device, sizeof device);
            if (found < 0) usleep(20000);
        }
        if (found < 0) {
            error_marker("volume %s: no disk with that serial or label", serial);
            return -1;
        }
        make_dirs(target);
        if (mount(device, target, fstype, MS_NOSUID | MS_NODEV, NULL) < 0) {
            error_marker("volume %s: mount %s on %s: %s", serial, device, target, strerror(errno));
            return -1;
        }
        marker("volume-mounted", "\"name\":\"%s\",\"device\":\"%s\"", serial, device);
    }
    return 0;
}

/* Write every secret file, mode 0400, before the workload starts; -1 (after an error marker
 * that names the path, never the content) when one cannot be written. Inside a VM the
 * directory is a fresh tmpfs (never the root disk); the process sandbox provides its own. */
static int write_secret_files(struct config *c) {
    if (!c->secret_files.count) return 0;
    if (pid1) {
        make_dirs(SECRET_DIR);
        if (mount("tmpfs", SECRET_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "mode=0700,size=2m") < 0) {
            error_marker("mount tmpfs on %s: %s", SECRET_DIR, strerror(errno));
            return -1;
        }
    }
    for (size_t i = 0; i < c->secret_files.count; i++) {
        char *record = c->secret_files.items[i];
        char *space = strchr(record, ' ');
        *space = 0; /* the path; the content follows */
        const char *content = space + 1;
        char *slash = strrchr(record, '/');
        *slash = 0;
        make_dirs(record);
        *slash = '/';
        unlink(record); /* a file of an earlier start is 0400: replace it, never write into it */
        int fd = open(record, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0400);
        size_t len = strlen(content), done = 0;
        while (fd >= 0 && done < len) {
            ssize_t n = write(fd, content + done, len - done);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            done += (size_t)n;
        }
        int err = errno;
        if (fd < 0 || done < len || close(fd) < 0) {
            error_marker("secret file %s: %s", record, strerror(fd < 0 || done < len ? err : errno));
            *space = ' ';
            return -1;
        }
        *space = ' ';
    }
    return 0;
}

static int ifreq_socket(void) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) error_marker("socket: %s", strerror(errno));
    return fd;
}

static int link_up(int fd, const char *name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0) return -1;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    return ioctl(fd, SIOCSIFFLAGS, &ifr);
}

static void set_inet(struct sockaddr *sa, in_addr_t address) {
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = address;
}

/* A VM restored from a snapshot has the template's MAC address until it is given its own. */
static void set_mac(int fd, struct config *c) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, c->iface, IFNAMSIZ - 1);
    ifr.ifr_hwaddr.sa_family = 1; /* ARPHRD_ETHER */
    for (int i = 0; i < 6; i++)
        ifr.ifr_hwaddr.sa_data[i] = (char)strtol(c->mac + 3 * i, NULL, 16);
    if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0)
        error_marker("MAC address %s on %s: %s", c->mac, c->iface, strerror(errno));
}

static void configure_network(struct config *c) {
    int fd = ifreq_socket();
    if (fd < 0) return;
    if (c->mac) set_mac(fd, c);
    if (link_up(fd, "lo") < 0) error_marker("lo up: %s", strerror(errno));
    if (c->ip) {
        char address[64];
        strncpy(address, c->ip, sizeof address - 1);
        address[sizeof address - 1] = 0;
        int prefix = 24;
        char *slash = strchr(address, '/');
        if (slash) {
            *slash = 0;
            prefix = atoi(slash + 1);
        }
        struct in_addr in;
        if (inet_pton(AF_INET, address, &in) != 1) {
            error_marker("bad address %s", c->ip);
        } else {
            struct ifreq ifr;
            memset(&ifr, 0, sizeof ifr);
            strncpy(ifr.ifr_name, c->iface, IFNAMSIZ - 1);
            set_inet(&ifr.ifr_addr, in.s_addr);
            /* The interface may take a moment to appear after virtio_net loads. */
            int ok = -1;
            for (int attempt = 0; attempt < 100 && ok < 0; attempt++) {
                ok = ioctl(fd, SIOCSIFADDR, &ifr);
                if (ok < 0) usleep(20000);
            }
            if (ok < 0) error_marker("address %s on %s: %s", c->ip, c->iface, strerror(errno));
            in_addr_t mask = prefix <= 0 ? 0 : htonl(0xffffffffu << (32 - prefix));
            set_inet(&ifr.ifr_netmask, mask);
            if (ioctl(fd, SIOCSIFNETMASK, &ifr) < 0)
                error_marker("netmask on %s: %s", c->iface, strerror(errno));
            if (link_up(fd, c->iface) < 0)
                error_marker("%s up: %s", c->iface, strerror(errno));
        }
    }
    if (c->gateway) {
        struct in_addr gw;
        if (inet_pton(AF_INET, c->gateway, &gw) != 1) {
            error_marker("bad gateway %s", c->gateway);
        } else {
            struct rtentry route;
            memset(&route, 0, sizeof route);
            set_inet(&route.rt_dst, INADDR_ANY);
            set_inet(&route.rt_genmask, INADDR_ANY);
            set_inet(&route.rt_gateway, gw.s_addr);
            route.rt_flags = RTF_UP | RTF_GATEWAY;
            route.rt_dev = c->iface;
            if (ioctl(fd, SIOCADDRT, &route) < 0 && errno != EEXIST)
                error_marker("default route via %s: %s", c->gateway, strerror(errno));
        }
    }
    close(fd);
    if (c->hostname && sethostname(c->hostname, strlen(c->hostname)) < 0)
        error_marker("hostname %s: %s", c->hostname, strerror(errno));
}

static void power_off(void) {
    marker("poweroff", NULL);
    sync();
    reboot(RB_POWER_OFF);
    for (;;) pause();
}

/* ------------------------------------------------------------------- the workload -- */

static void on_stop(int sig) { stop_requested = sig; }

/* From <linux/input.h> and <linux/input-event-codes.h>, which musl-gcc does not see: the evdev
 * record (x86-64 layout) and the one key and ioctl this init uses. A stable kernel ABI. */
struct input_event {
    struct timeval time;
    unsigned short type;
    unsigned short code;
    int value;
};
#define EV_KEY 0x01
#define KEY_POWER 116
#define KEY_MAX 0x2ff
#define EVIOCGBIT(ev, len) _IOC(_IOC_READ, 'E', 0x20 + (ev), len)

/* Who asked for the stop, for the "stopped" marker. */
static const char *stop_source(int sig) {
    if (sig == SIGPWR) return "power-button";
    if (sig == SIGINT) return pid1 ? "ctrl-alt-del" : "sigint";
    return "sigterm";
}

/* Does the evdev device `fd` have a power key? */
static int has_power_key(int fd) {
    unsigned long keys[KEY_MAX / (8 * sizeof(unsigned long)) + 1];
    memset(keys, 0, sizeof keys);
    if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) < 0) return 0;
    size_t bits = 8 * sizeof(unsigned long);
    return (keys[KEY_POWER / bits] >> (KEY_POWER % bits)) & 1;
}

/* The ACPI power button (QEMU's system_powerdown on -M microvm: the GED notifies the PNP0C0C
 * button, whose driver reports KEY_POWER on an evdev device). A child of PID 1 waits for the
 * key and sends PID 1 SIGPWR; being a separate process, it neither delays the boot while the
 * device appears nor needs the supervisor loop to poll. Without a button (no ACPI, no button or
 * evdev driver in the kernel) the runtime's other ways still work: Ctrl-Alt-Del, its own
 * timeout. */
static nfds_t open_power_buttons(struct pollfd fds[8]) {
    nfds_t count = 0;
    DIR *dir = opendir("/dev/input");
    struct dirent *entry;
    while (dir && (entry = readdir(dir)) && count < 8) {
        if (strncmp(entry->d_name, "event", 5)) continue;
        char path[300];
        snprintf(path, sizeof path, "/dev/input/%s", entry->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        if (!has_power_key(fd)) {
            close(fd);
            continue;
        }
        fds[count].fd = fd;
        fds[count].events = POLLIN;
        count++;
    }
    if (dir) closedir(dir);
    return count;
}

static void watch_power_button(void) {
    /* Opened before the workload starts when the device is there already (a kernel with the
     * button built in): a press right after "workload-started" is then never lost to a child
     * that has not opened the device yet. */
    struct pollfd fds[8];
    nfds_t count = open_power_buttons(fds);
    pid_t pid = fork();
    if (pid != 0) {
        if (pid < 0) error_marker("fork (power button watch): %s", strerror(errno));
        for (nfds_t i = 0; i < count; i++) close(fds[i].fd);
        return;
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGPWR, SIG_DFL);
    /* The devices appear a moment after their drivers bind: look for up to 5 s. */
    for (int attempt = 0; attempt < 100 && count == 0; attempt++) {
        usleep(50000);
        count = open_power_buttons(fds);
    }
    if (!count) _exit(0);
    for (;;) {
        if (poll(fds, count, -1) < 0) {
            if (errno == EINTR) continue;
            _exit(1);
        }
        for (nfds_t i = 0; i < count; i++) {
            if (!(fds[i].revents & POLLIN)) continue;
            struct input_event events[16];
            ssize_t n = read(fds[i].fd, events, sizeof events);
            for (ssize_t k = 0; k + (ssize_t)sizeof *events <= n; k += (ssize_t)sizeof *events) {
                struct input_event *e = &events[k / (ssize_t)sizeof *events];
                if (e->type == EV_KEY && e->code == KEY_POWER && e->value == 1) kill(1, SIGPWR);
            }
        }
    }
}

static pid_t start_workload(struct config *c) {
    char **argv = xrealloc(NULL, (c->args.count + 2) * sizeof *argv);
    size_t n = 0;
    argv[n++] = c->exec;
    for (size_t i = 0; i < c->args.count; i++) argv[n++] = c->args.items[i];
    argv[n] = NULL;

    int ready[2];
    if (pipe2(ready, O_CLOEXEC) < 0) return -1;
    pid_t pid = fork();
    if (pid < 0) {
        error_marker("fork: %s", strerror(errno));
        free(argv);
        return -1;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGPWR, SIG_DFL);
        setsid();
        for (size_t i = 0; i < c->env.count; i++) putenv(c->env.items[i]);
        if (c->workdir && chdir(c->workdir) < 0) {
            int err = errno;
            (void)!write(ready[1], &err, sizeof err);
            _exit(126);
        }
        execv(c->exec, argv);
        int err = errno;
        (void)!write(ready[1], &err, sizeof err);
        _exit(127);
    }
    close(ready[1]);
    free(argv);
    int err = 0;
    ssize_t got = read(ready[0], &err, sizeof err);
    close(ready[0]);
    if (got == sizeof err) {
        int status;
        waitpid(pid, &status, 0);
        error_marker("cannot start %s%s%s: %s", c->exec, c->workdir ? " in " : "",
                     c->workdir ? c->workdir : "", strerror(err));
        return -1;
    }
    marker("workload-started", "\"pid\":%d", (int)pid);
    return pid;
}

static int exit_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 255;
}

/* Wait for the workload while reaping every other child (orphans are re-parented to PID 1).
 * On a stop request: SIGTERM to the workload's process group, SIGKILL after the grace period.
 * The stop signals and SIGCHLD are blocked and taken with sigtimedwait, so a request that
 * arrives at any moment is acted on at once (no window between a check and a blocking wait). */
static int supervise(pid_t workload, int grace) {
    sigset_t wanted, previous;
    sigemptyset(&wanted);
    sigaddset(&wanted, SIGCHLD);
    sigaddset(&wanted, SIGTERM);
    sigaddset(&wanted, SIGINT);
    sigaddset(&wanted, SIGPWR);
    sigprocmask(SIG_BLOCK, &wanted, &previous);
    int killed = 0, code = -1;
    double deadline = 0;
    for (;;) {
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
            if (pid == workload) code = exit_code(status);
        if (code >= 0) break;
        if (pid < 0 && errno == ECHILD) {
            code = 255;
            break;
        }
        if (stop_requested && !deadline) {
            kill(-workload, SIGTERM);
            kill(workload, SIGTERM);
            deadline = now() + grace;
        }
        if (deadline && !killed && now() >= deadline) {
            kill(-workload, SIGKILL);
            kill(workload, SIGKILL);
            killed = 1;
        }
        double wait = 1.0;
        if (deadline && !killed && deadline - now() < wait) wait = deadline - now();
        if (wait < 0.001) wait = 0.001;
        struct timespec timeout = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        int sig = sigtimedwait(&wanted, NULL, &timeout);
        if (sig == SIGTERM || sig == SIGINT || sig == SIGPWR) stop_requested = sig;
    }
    sigprocmask(SIG_SETMASK, &previous, NULL);
    return code;
}

int main(int argc, char **argv) {
    const char *config_path = DEFAULT_CONFIG;
    const char *vm_config_path = DEFAULT_VM_CONFIG;
    int vm_config_given = 0;
    pid1 = getpid() == 1;
    for (int i = 1; i < argc; i++) {
        /* PID 1 of a process sandbox on the host, not of a VM: supervise only. */
        if (!strcmp(argv[i], "--supervisor")) pid1 = 0;
    }
    /* A VM's PID 1 takes nothing from argv or its environment: the kernel hands it every
     * command-line word and name=value it does not know itself, and neither is a channel for
     * configuration. */
    if (pid1) {
        argc = 1;
        clearenv();
        setenv("HOME", "/", 1);
        setenv("TERM", "linux", 1);
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--supervisor")) continue;
        if (!strcmp(argv[i], "--config") && i + 1 < argc) config_path = argv[++i];
        else if (!strcmp(argv[i], "--vm-config") && i + 1 < argc) {
            vm_config_path = argv[++i];
            vm_config_given = 1;
        } else if (!pid1 && !strcmp(argv[i], "--help")) {
            printf("usage: reconciler-init [--config FILE] [--vm-config FILE] [--supervisor]\n");
            return 0;
        }
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGPWR, &sa, NULL);

    struct config c;
    if (pid1) {
        mount_basics();
        ensure_console();
        /* Ctrl-Alt-Del (Firecracker's SendCtrlAltDel) becomes SIGINT: a graceful stop. */
        reboot(RB_DISABLE_CAD);
    }
    /* In host mode only a file named on the command line is read; inside a VM the runtime's
     * initramfs segment puts it at the default path. */
    if (pid1 || vm_config_given) load_vm_config(vm_config_path, vm_config_given);
    if (vm_config_bad) {
        if (pid1) power_off();
        return 127;
    }
    load_config(&c, config_path);
    if (pid1) {
        load_modules(&c);
        if (c.snapshot_template && await_snapshot_config(&c, config_path) < 0) power_off();
        if (c.root) {
            if (switch_root(&c) < 0) power_off();
            /* The root disk carries the workload's own config; the per-VM one still wins. */
            load_config(&c, config_path);
        }
        configure_network(&c);
        if (mount_volumes(&c) < 0) power_off();
    }
    if (write_secret_files(&c) < 0) {
        if (pid1) power_off();
        return 127;
    }
    marker("booted", NULL);

    int code = 0;
    if (c.boot_only) {
        /* The KVM canary: proving the guest boots is all that is asked. */
    } else if (!c.exec) {
        error_marker("no exec= in %s; nothing to run", config_path);
        code = 127;
    } else {
        if (pid1) watch_power_button();
        while (!stop_requested) {
            pid_t workload = start_workload(&c);
            if (workload < 0) {
                code = 127;
                break;
            }
            code = supervise(workload, c.grace);
            marker("workload-exited", "\"code\":%d", code);
            int again = !stop_requested && (!strcmp(c.restart, "always") ||
                                             (!strcmp(c.restart, "on-failure") && code != 0));
            if (!again) break;
            sleep(1); /* a stop request interrupts it, and the loop ends */
        }
        if (stop_requested) marker("stopped", "\"by\":\"%s\"", stop_source(stop_requested));
    }
    if (pid1) {
        if (c.poweroff) power_off();
        for (;;) {
            int status;
            if (waitpid(-1, &status, 0) < 0) pause();
        }
    }
    return code;
}
