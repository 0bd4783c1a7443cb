/*
 * qemu-insn: a QEMU TCG plugin (user mode) that counts the guest instructions a process
 * executes and reports the running total whenever asked, so that a long-running server's cost
 * per unit of work can be read as the difference between two readings around a known amount of
 * work (issue 21: instructions per relayed packet and per login on router CPUs).
 *
 *   qemu-mipsel -plugin target/qemu-insn/libqemu-insn.so,ctl=FIFO,out=FILE ./derpd ...
 *
 * Each newline written to the control FIFO (ctl=, made with mkfifo) appends one line to the
 * output file (out=): the total of guest instructions executed so far, all threads. At exit the
 * total is appended once more, as "exit TOTAL".
 *
 * Counting: every translated block, each time it runs, adds its instruction count (a callback
 * per block execution, not per instruction). In user mode every guest thread is a vCPU of its
 * own; each adds into one of SLOTS cache-line slots with a relaxed atomic add (QEMU 7.2's inline
 * counters are not atomic, so several threads would lose counts). A block left early (a fault,
 * a syscall that does not return) still counts whole: the error is a few instructions per such
 * event, far below a relayed packet's thousands.
 *
 * Built by scripts/ensure-qemu-insn.sh against qemu-plugin.h from Debian's QEMU source package
 * (Debian ships the plugin-capable qemu-user, but not the header).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define SLOTS 64

static struct {
    uint64_t n;
    char pad[56];
} counts[SLOTS] __attribute__((aligned(64)));

static const char *ctl_path;
static const char *out_path;

static uint64_t total(void)
{
    uint64_t t = 0;
    for (int i = 0; i < SLOTS; i++) {
        t += __atomic_load_n(&counts[i].n, __ATOMIC_RELAXED);
    }
    return t;
}

static void append(const char *prefix, uint64_t n)
{
    FILE *out = fopen(out_path, "a");
    if (!out) {
        perror("qemu-insn: out");
        return;
    }
    fprintf(out, "%s%llu\n", prefix, (unsigned long long)n);
    fclose(out);
}

static void tb_exec(unsigned int vcpu, void *insns)
{
    __atomic_fetch_add(&counts[vcpu % SLOTS].n, (uint64_t)(uintptr_t)insns, __ATOMIC_RELAXED);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                         (void *)(uintptr_t)qemu_plugin_tb_n_insns(tb));
}

/* A host thread of the plugin's own (the guest never sees it): one reading per line written
 * to the FIFO, for as many writers as come, one after another. */
static void *control(void *arg)
{
    (void)arg;
    for (;;) {
        FILE *ctl = fopen(ctl_path, "r"); /* blocks until a writer opens the FIFO */
        if (!ctl) {
            perror("qemu-insn: ctl");
            return NULL;
        }
        int c;
        while ((c = fgetc(ctl)) != EOF) {
            if (c == '\n') {
                append("", total());
            }
        }
        fclose(ctl);
    }
    return NULL;
}

static void at_exit(qemu_plugin_id_t id, void *p)
{
    (void)id;
    (void)p;
    append("exit ", total());
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "ctl=", 4) == 0) {
            ctl_path = strdup(argv[i] + 4);
        } else if (strncmp(argv[i], "out=", 4) == 0) {
            out_path = strdup(argv[i] + 4);
        } else {
            fprintf(stderr, "qemu-insn: unknown argument '%s' (ctl=FIFO, out=FILE)\n", argv[i]);
            return -1;
        }
    }
    if (!out_path) {
        fprintf(stderr, "qemu-insn: needs out=FILE (and ctl=FIFO for readings while it runs)\n");
        return -1;
    }
    if (ctl_path) {
        pthread_t t;
        if (pthread_create(&t, NULL, control, NULL) != 0) {
            fprintf(stderr, "qemu-insn: cannot start the control thread\n");
            return -1;
        }
        pthread_detach(t);
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
