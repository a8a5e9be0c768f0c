/* config.c: client configuration from the environment, Caml Crush compatible.
 *
 *   PKCS11PROXY_SOCKET_PATH   host:port | [v6]:port | /path | tcp://h:p | unix:///path
 *                             | tls://h:p | tls+unix:///path
 *   PKCS11PROXY_LIBNAME       module alias (else first line of ~/.camlcrushlibname)
 *   PKCS11PROXY_RPC_TIMEOUT   seconds (default 25; 0 or garbage = default)
 *   PKCS11PROXY_CA_FILE, PKCS11PROXY_CERT_FILE, PKCS11PROXY_PRIVKEY_FILE   TLS
 *   PKCS11PROXY_TLS_VERIFY_HOSTNAME  1 (default) | 0: check the server's name (ours)
 *   PKCS11PROXY_TLS_SERVER_NAME      the name to check instead of the address's (ours)
 *   PKCS11PROXY_TLS_MIN_VERSION      1.2 (default) | 1.3 (ours)
 *   PKCS11PROXY_MAX_RECORD    largest reply record accepted, bytes (ours)
 *   PKCS11PROXY_SERIAL        1 = one call in flight per connection (ours)
 *
 * Read at every C_Initialize, never at load time, and never fatal: a bad value
 * becomes one line on stderr and an error from C_Initialize. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "p11g.h"

#define DEFAULT_ADDRESS "127.0.0.1:4444"

static int copy_str(char *dst, size_t cap, const char *src, size_t n)
{
    if (n >= cap)
        return -1;
    memcpy(dst, src, n);
    dst[n] = '\0';
    return 0;
}

static int parse_port(const char *s, char *out, size_t cap)
{
    char *end;
    if (*s == '\0' || strlen(s) >= cap)
        return -1;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v <= 0 || v > 65535)
        return -1;
    snprintf(out, cap, "%ld", v);
    return 0;
}

static int parse_hostport(struct p11g_config *cfg, const char *s)
{
    const char *colon;
    const char *host = s;
    size_t hlen;
    if (*s == '[') { /* [IPv6]:port */
        const char *close = strchr(s, ']');
        if (close == NULL || close[1] != ':')
            return -1;
        host = s + 1;
        hlen = (size_t)(close - host);
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL || strchr(s, ':') != colon)
            return -1; /* no port, or a third field */
        hlen = (size_t)(colon - s);
    }
    if (hlen == 0 || copy_str(cfg->host, sizeof cfg->host, host, hlen) != 0)
        return -1;
    return parse_port(colon + 1, cfg->port, sizeof cfg->port);
}

static int parse_address(struct p11g_config *cfg, const char *s)
{
    if (strncmp(s, "unix://", 7) == 0) {
        cfg->transport = P11G_UNIX;
        s += 7;
        return (*s == '\0' || copy_str(cfg->host, 108, s, strlen(s)) != 0) ? -1 : 0;
    }
    if (strncmp(s, "tcp://", 6) == 0) {
        cfg->transport = P11G_TCP;
        return parse_hostport(cfg, s + 6);
    }
    if (strncmp(s, "tls://", 6) == 0) {
        cfg->transport = P11G_TCP;
        cfg->tls = 1;
        return parse_hostport(cfg, s + 6);
    }
    if (strncmp(s, "tls+unix://", 11) == 0) {
        cfg->transport = P11G_UNIX;
        cfg->tls = 1;
        s += 11;
        return (*s == '\0' || copy_str(cfg->host, 108, s, strlen(s)) != 0) ? -1 : 0;
    }
    if (strstr(s, "://") != NULL)
        return -1; /* an unknown scheme */
    if (s[0] == '/' || s[0] == '.' || strchr(s, ':') == NULL) {
        cfg->transport = P11G_UNIX;
        return (*s == '\0' || copy_str(cfg->host, 108, s, strlen(s)) != 0) ? -1 : 0;
    }
    /* Plain host:port is TCP, or TLS when a CA file is configured (the way
     * Caml Crush's libp11clienttcpssl.so reads the same variable). */
    const char *ca = getenv("PKCS11PROXY_CA_FILE");
    cfg->transport = P11G_TCP;
    cfg->tls = (ca != NULL && *ca != '\0');
    return parse_hostport(cfg, s);
}

static int read_libname_file(struct p11g_config *cfg)
{
    const char *home = getenv("HOME");
    char path[P11G_MAX_ADDR];
    if (home == NULL || *home == '\0')
        return -1;
    if ((size_t)snprintf(path, sizeof path, "%s/.camlcrushlibname", home) >= sizeof path)
        return -1;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    char line[P11G_MAX_NAME];
    char *got = fgets(line, sizeof line, f);
    fclose(f);
    if (got == NULL)
        return -1;
    size_t n = strcspn(line, "\r\n");
    line[n] = '\0';
    if (n == 0)
        return -1;
    return copy_str(cfg->libname, sizeof cfg->libname, line, n);
}

static int env_file(char *dst, size_t cap, const char *name)
{
    const char *v = getenv(name);
    dst[0] = '\0';
    if (v == NULL || *v == '\0')
        return 0;
    return copy_str(dst, cap, v, strlen(v));
}

/* 1 / 0 for the usual spellings of a boolean, -1 for anything else. */
static int parse_bool(const char *v, int dflt)
{
    static const char *const yes[] = {"1", "yes", "true", "on"};
    static const char *const no[] = {"0", "no", "false", "off"};
    if (v == NULL || *v == '\0')
        return dflt;
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        if (strcasecmp(v, yes[i]) == 0)
            return 1;
        if (strcasecmp(v, no[i]) == 0)
            return 0;
    }
    return -1;
}

/* The TLS settings.  Anything that weakens server authentication must be
 * spelled out: an unreadable value is an error, never a default. */
static CK_RV load_tls(struct p11g_config *cfg, char *err, size_t errlen)
{
    if (cfg->ca_file[0] == '\0') {
        snprintf(err, errlen, "TLS needs PKCS11PROXY_CA_FILE (the CA that signed the server)");
        return CKR_GENERAL_ERROR;
    }
    if (cfg->key_file[0] != '\0' && cfg->cert_file[0] == '\0') {
        snprintf(err, errlen, "PKCS11PROXY_PRIVKEY_FILE is set but PKCS11PROXY_CERT_FILE is not");
        return CKR_GENERAL_ERROR;
    }
    if (cfg->cert_file[0] != '\0' && cfg->key_file[0] == '\0')
        memcpy(cfg->key_file, cfg->cert_file, sizeof cfg->key_file); /* one PEM with both */

    cfg->verify_hostname = parse_bool(getenv("PKCS11PROXY_TLS_VERIFY_HOSTNAME"), 1);
    if (cfg->verify_hostname < 0) {
        snprintf(err, errlen, "bad PKCS11PROXY_TLS_VERIFY_HOSTNAME (want 1 or 0)");
        return CKR_GENERAL_ERROR;
    }
    const char *v = getenv("PKCS11PROXY_TLS_MIN_VERSION");
    if (v == NULL || *v == '\0' || strcmp(v, "1.2") == 0)
        cfg->tls13_only = 0;
    else if (strcmp(v, "1.3") == 0)
        cfg->tls13_only = 1;
    else {
        snprintf(err, errlen, "bad PKCS11PROXY_TLS_MIN_VERSION (want 1.2 or 1.3)");
        return CKR_GENERAL_ERROR;
    }
    /* The name the certificate must carry: explicit, else the host we dial;
     * a Unix socket has no host name, so "localhost" stands for this machine. */
    const char *name = getenv("PKCS11PROXY_TLS_SERVER_NAME");
    if (name == NULL || *name == '\0')
        name = cfg->transport == P11G_UNIX ? "localhost" : cfg->host;
    if (copy_str(cfg->server_name, sizeof cfg->server_name, name, strlen(name)) != 0) {
        snprintf(err, errlen, "the TLS server name is too long");
        return CKR_GENERAL_ERROR;
    }
    return CKR_OK;
}

CK_RV p11g_config_load(struct p11g_config *cfg, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->timeout_s = P11G_DEFAULT_TIMEOUT;
    cfg->max_record = P11G_DEFAULT_MAX_RECORD;

    const char *addr = getenv("PKCS11PROXY_SOCKET_PATH");
    if (addr == NULL || *addr == '\0')
        addr = DEFAULT_ADDRESS;
    if (strlen(addr) >= P11G_MAX_ADDR || parse_address(cfg, addr) != 0) {
        snprintf(err, errlen,
                 "bad PKCS11PROXY_SOCKET_PATH (want host:port, /path, tcp://, unix://, tls:// "
                 "or tls+unix://)");
        return CKR_GENERAL_ERROR;
    }

    const char *lib = getenv("PKCS11PROXY_LIBNAME");
    if (lib != NULL && *lib != '\0') {
        if (copy_str(cfg->libname, sizeof cfg->libname, lib, strlen(lib)) != 0) {
            snprintf(err, errlen, "PKCS11PROXY_LIBNAME is too long");
            return CKR_GENERAL_ERROR;
        }
    } else if (read_libname_file(cfg) != 0) {
        snprintf(err, errlen,
                 "no module name: set PKCS11PROXY_LIBNAME or write it to ~/.camlcrushlibname");
        return CKR_DEVICE_ERROR;
    }

    const char *t = getenv("PKCS11PROXY_RPC_TIMEOUT");
    if (t != NULL && *t != '\0') {
        char *end;
        errno = 0;
        long v = strtol(t, &end, 10);
        if (errno == 0 && *end == '\0' && v > 0 && v <= 86400)
            cfg->timeout_s = (int)v;
    }

    const char *m = getenv("PKCS11PROXY_MAX_RECORD");
    if (m != NULL && *m != '\0') {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(m, &end, 10);
        if (errno == 0 && *end == '\0' && v >= P11G_MIN_MAX_RECORD && v <= ((size_t)1 << 30))
            cfg->max_record = (size_t)v;
    }

    const char *s = getenv("PKCS11PROXY_SERIAL");
    cfg->serial = (s != NULL && strcmp(s, "1") == 0);
    cfg->channels = parse_bool(getenv("PKCS11PROXY_CHANNELS"), 1);
    if (cfg->channels < 0) {
        snprintf(err, errlen, "bad PKCS11PROXY_CHANNELS (want 1 or 0)");
        return CKR_GENERAL_ERROR;
    }

    if (env_file(cfg->ca_file, sizeof cfg->ca_file, "PKCS11PROXY_CA_FILE") != 0 ||
        env_file(cfg->cert_file, sizeof cfg->cert_file, "PKCS11PROXY_CERT_FILE") != 0 ||
        env_file(cfg->key_file, sizeof cfg->key_file, "PKCS11PROXY_PRIVKEY_FILE") != 0) {
        snprintf(err, errlen, "a PKCS11PROXY_*_FILE path is too long");
        return CKR_GENERAL_ERROR;
    }
    if (cfg->tls)
        return load_tls(cfg, err, errlen);
    return CKR_OK;
}
