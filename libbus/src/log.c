/*
 * Logging: level filtering, formatting and the ready stderr callback.
 * bus_log_stderr builds the whole line in a stack buffer and writes it with
 * one write(2) so that lines from several threads never interleave.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <bus/err.h>
#include <bus/log.h>

#include "platform.h"

#define LOG_MSG_MAX 1024
#define LOG_LINE_MAX (LOG_MSG_MAX * 6 + 256) /* JSON escaping can grow 6x */

const char *
bus_log_level_name(bus_log_level level)
{
    switch (level) {
    case BUS_LOG_ERR: return "err";
    case BUS_LOG_WARN: return "warn";
    case BUS_LOG_INFO: return "info";
    case BUS_LOG_DEBUG: return "debug";
    default: return level < BUS_LOG_WARN ? "err" : "debug";
    }
}

int
bus_log_level_parse(const char *s, bus_log_level *out)
{
    static const struct {
        const char *name;
        bus_log_level level;
    } names[] = {
        {"err", BUS_LOG_ERR},
        {"error", BUS_LOG_ERR}, {"warn", BUS_LOG_WARN},
        {"warning", BUS_LOG_WARN}, {"info", BUS_LOG_INFO},
        {"debug", BUS_LOG_DEBUG},
    };
    size_t i;

    if (s == NULL || out == NULL)
        return BUS_EINVAL;
    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            *out = names[i].level;
            return BUS_OK;
        }
    }
    return BUS_EINVAL;
}

bool
bus_log_enabled(const bus_logger *lg, bus_log_level level)
{
    bus_log_level threshold;

    if (lg == NULL || lg->fn == NULL)
        return false;
    threshold = lg->level == BUS_LOG_DEFAULT ? BUS_LOG_INFO : lg->level;
    return level <= threshold;
}

void
bus_logf(const bus_logger *lg, bus_log_level level, const char *subsys,
         const char *fmt, ...)
{
    char msg[LOG_MSG_MAX];
    va_list ap;

    if (!bus_log_enabled(lg, level))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    lg->fn(lg->opaque, level, subsys, msg);
}

/* Appends s to buf at *pos with JSON string escaping, within cap. */
static void
log_json_escape(char *buf, size_t cap, size_t *pos, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t p = *pos;

    for (; *s != '\0' && p + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[p++] = '\\';
            buf[p++] = (char)c;
        } else if (c == '\n') {
            buf[p++] = '\\';
            buf[p++] = 'n';
        } else if (c == '\r') {
            buf[p++] = '\\';
            buf[p++] = 'r';
        } else if (c == '\t') {
            buf[p++] = '\\';
            buf[p++] = 't';
        } else if (c < 0x20) {
            memcpy(buf + p, "\\u00", 4);
            p += 4;
            buf[p++] = hex[c >> 4];
            buf[p++] = hex[c & 15];
        } else {
            buf[p++] = (char)c;
        }
    }
    *pos = p;
}

static void
log_append(char *buf, size_t cap, size_t *pos, const char *s)
{
    size_t n = strlen(s);

    if (*pos + n >= cap)
        n = cap - *pos - 1;
    memcpy(buf + *pos, s, n);
    *pos += n;
}

void
bus_log_stderr(void *opaque, bus_log_level level, const char *subsys,
               const char *msg)
{
    const bus_log_format *fmt = opaque;
    char line[LOG_LINE_MAX];
    char ts[64];
    int64_t now = bus__clock_real_ns();
    time_t secs = (time_t)(now / 1000000000);
    struct tm tm;
    size_t pos = 0;
    ssize_t w;
    size_t off;

    gmtime_r(&secs, &tm);
    snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ",
             tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
             tm.tm_min, tm.tm_sec, (int)((now / 1000000) % 1000));
    if (subsys == NULL)
        subsys = "-";
    if (msg == NULL)
        msg = "";
    if (fmt != NULL && *fmt == BUS_LOG_JSON) {
        log_append(line, sizeof(line), &pos, "{\"ts\":\"");
        log_append(line, sizeof(line), &pos, ts);
        log_append(line, sizeof(line), &pos, "\",\"level\":\"");
        log_append(line, sizeof(line), &pos, bus_log_level_name(level));
        log_append(line, sizeof(line), &pos, "\",\"subsys\":\"");
        log_json_escape(line, sizeof(line), &pos, subsys);
        log_append(line, sizeof(line), &pos, "\",\"msg\":\"");
        log_json_escape(line, sizeof(line), &pos, msg);
        log_append(line, sizeof(line), &pos, "\"}\n");
    } else {
        char head[96];
        char lvl[8];
        size_t i;
        const char *ln = bus_log_level_name(level);

        for (i = 0; ln[i] != '\0' && i < sizeof(lvl) - 1; i++)
            lvl[i] = (char)(ln[i] >= 'a' && ln[i] <= 'z' ? ln[i] - 32 : ln[i]);
        lvl[i] = '\0';
        snprintf(head, sizeof(head), "%s %-5s ", ts, lvl);
        log_append(line, sizeof(line), &pos, head);
        log_append(line, sizeof(line), &pos, subsys);
        log_append(line, sizeof(line), &pos, ": ");
        log_append(line, sizeof(line), &pos, msg);
        if (pos >= sizeof(line) - 1)
            pos = sizeof(line) - 2;
        line[pos++] = '\n';
    }
    for (off = 0; off < pos; off += (size_t)w) {
        w = write(STDERR_FILENO, line + off, pos - off);
        if (w <= 0)
            break; /* nothing sensible to do about a broken stderr */
    }
}
