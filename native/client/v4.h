/* v4.h: protocol version 4 in the client (docs/protocol.md, docs/client.md).
 *
 * Version 4 is negotiated per connection by the codec: the first call (the
 * handshake's SetupArch) goes out as version 4; a Caml Crush server answers
 * PROG_MISMATCH (3..3) and the call is sent again as version 3, which the
 * connection then keeps.  PKCS11PROXY_PROTOCOL=3 skips the attempt.
 *
 * How the v4 kinds use struct p11g_arg (p11g.h):
 *   X typed mechanism  mech (NULL: mechanism 0, no parameter)
 *   Y typed parameter  h = the tag (from p11g_v4_param_tag), ptr/len = the
 *                      caller's pParameter/ulParameterLen, tmpl_mode =
 *                      P11G_V4_ZERO_OUT to send the output buffer (GCM tag,
 *                      CCM MAC) as zeros
 *   Z typed template   tmpl/count
 *   L (an argument)    the types of tmpl/count (GetAttributeValue)
 * Results of kind Z and Y are validated views: ptr/len cover their bytes. */
#ifndef P11G_V4_H
#define P11G_V4_H

#include "p11g.h"

#define P11G_V4_ZERO_OUT 2

/* ---- negotiation (v4.c) ------------------------------------------------ */
/* The version a connection speaks: 3, 4, or 0 before its first call. */
P11G_HIDDEN unsigned p11g_conn_version(const struct p11g_conn *c);
P11G_HIDDEN void p11g_conn_set_version(const struct p11g_conn *c, unsigned version);
/* 1 when PKCS11PROXY_PROTOCOL=3 asks for version 3 without trying 4. */
P11G_HIDDEN int p11g_v3_forced(void);
/* The version of the live connection (3 when there is none: the call that
 * follows fails on its own). */
P11G_HIDDEN unsigned p11g_proto(void);

/* The end of a v4 output call (result: rv, value, length), C's way: a NULL
 * buffer gets the length, a small one CKR_BUFFER_TOO_SMALL and the length,
 * a large enough one the value, never more than *out_len bytes. */
P11G_HIDDEN CK_RV p11g_v4_output(const struct p11g_reply *rep, const struct p11g_res *value,
                                 const struct p11g_res *length, CK_RV mrv, CK_BYTE_PTR out,
                                 CK_ULONG_PTR out_len);

/* ---- mechanism parameters (v4mech.c) ----------------------------------- */
/* Checks a mechanism for a TM argument (all *Init, key generation, wrap,
 * unwrap, derive): CKR_OK, CKR_ARGUMENTS_BAD or CKR_MECHANISM_PARAM_INVALID. */
P11G_HIDDEN CK_RV p11g_v4_mech_check(const CK_MECHANISM *m);
P11G_HIDDEN void p11g_v4_enc_mech(struct p11g_enc *e, const CK_MECHANISM *m);
/* The tag of a per-message parameter (C_EncryptMessage & co.), or an error. */
P11G_HIDDEN CK_RV p11g_v4_param_tag(const void *p, CK_ULONG len, unsigned *tag);
P11G_HIDDEN void p11g_v4_enc_param(struct p11g_enc *e, unsigned tag, const void *p, CK_ULONG len,
                                   int zero_out);
/* Validates a typed parameter in a reply and skips it. */
P11G_HIDDEN int p11g_v4_skip_param(struct p11g_dec *d);
/* Copies the buffers of a per-message parameter that came back (wire: the
 * validated bytes of a Y result) into the caller's structure.  The tag and
 * every buffer length must be those that were sent. */
P11G_HIDDEN CK_RV p11g_v4_param_back(unsigned tag, void *p, CK_ULONG len, const uint8_t *wire,
                                     uint32_t wire_len);

/* ---- templates (v4tmpl.c) ---------------------------------------------- */
/* Checks an input template: CKR_OK, CKR_ARGUMENTS_BAD or
 * CKR_ATTRIBUTE_VALUE_INVALID (NULL value with a length, a template nested
 * in a nested template, an array whose length is no multiple of an element). */
P11G_HIDDEN CK_RV p11g_v4_tmpl_check(const CK_ATTRIBUTE *t, CK_ULONG n);
P11G_HIDDEN void p11g_v4_enc_tmpl(struct p11g_enc *e, const CK_ATTRIBUTE *t, CK_ULONG n);
P11G_HIDDEN void p11g_v4_enc_types(struct p11g_enc *e, const CK_ATTRIBUTE *t, CK_ULONG n);
P11G_HIDDEN int p11g_v4_skip_tmpl(struct p11g_dec *d);
/* Fills the caller's template from a GetAttributeValue reply (the validated
 * bytes of a Z result); mrv is the module's rv.  Returns the CK_RV for the
 * application. */
P11G_HIDDEN CK_RV p11g_v4_tmpl_fill(CK_ATTRIBUTE *t, CK_ULONG n, const uint8_t *wire,
                                    uint32_t wire_len, CK_RV mrv);

#endif /* P11G_V4_H */
