/*
 * Bulk RFC 6962 hashing for the audit verifier: leaf hashes of an export's entry lines and
 * tree heads of runs of leaf hashes, each a loop in C over OpenSSL's SHA-256 (one reused
 * EVP context), instead of two hashlib calls per entry. Loaded by ledger/rfc6962_native.py
 * through ctypes (which releases the GIL during each call); that module states the contract
 * and falls back to ledger.merkle's hashlib code, which the tests compare this with.
 *
 * No allocation beyond the OpenSSL context: the caller passes the output and scratch buffers
 * with their sizes, and every index is checked against them. Returns are counts, or a
 * negative FEDGATE_* code.
 */
#include <stdint.h>
#include <string.h>

#include <openssl/evp.h>

#define HASH_SIZE 32
#define FEDGATE_BAD_INPUT (-1)
#define FEDGATE_NO_ROOM (-2)
#define FEDGATE_OPENSSL (-3)

/* Bumped with any change to a function's arguments or meaning: ledger/rfc6962_native.py loads
 * only the version it was written for (a stale build is then not used, rather than misused). */
int64_t fedgate_rfc6962_abi(void) {
    return 1;
}

typedef struct {
    EVP_MD *md;
    EVP_MD_CTX *ctx;
} hasher;

static int hasher_open(hasher *h) {
    h->md = EVP_MD_fetch(NULL, "SHA256", NULL);
    h->ctx = EVP_MD_CTX_new();
    return h->md != NULL && h->ctx != NULL;
}

static void hasher_close(hasher *h) {
    EVP_MD_CTX_free(h->ctx);
    EVP_MD_free(h->md);
}

/* SHA-256(a || b) into out (32 bytes); b may be empty. */
static int sha256(hasher *h, const uint8_t *a, size_t a_len, const uint8_t *b, size_t b_len,
                  uint8_t *out) {
    return EVP_DigestInit_ex2(h->ctx, h->md, NULL) == 1
        && EVP_DigestUpdate(h->ctx, a, a_len) == 1
        && (b_len == 0 || EVP_DigestUpdate(h->ctx, b, b_len) == 1)
        && EVP_DigestFinal_ex(h->ctx, out, NULL) == 1;
}

/* The number of '\n' bytes in buf[0:len]. */
int64_t fedgate_count_lines(const uint8_t *buf, int64_t len) {
    int64_t lines = 0;
    const uint8_t *at = buf, *end = buf + (len > 0 ? len : 0);
    while (at < end && (at = memchr(at, '\n', (size_t)(end - at))) != NULL) {
        lines++;
        at++;
    }
    return lines;
}

/*
 * SHA-256 of each line of buf[0:len], which must end with '\n' (a line is the bytes up to and
 * including a '\n'). What is hashed of a line: the line without its final ",\n" if it ends so;
 * with last_is_end, the last line without its final '\n' instead; any other line whole.
 * Writes 32 bytes per line to out[0:out_len]. Returns the number of lines.
 */
int64_t fedgate_line_hashes(const uint8_t *buf, int64_t len, int last_is_end,
                            uint8_t *out, int64_t out_len) {
    if (len < 0 || out_len < 0 || (len > 0 && buf[len - 1] != '\n'))
        return FEDGATE_BAD_INPUT;
    hasher h;
    int64_t lines = 0, start = 0, result = 0;
    if (!hasher_open(&h)) {
        result = FEDGATE_OPENSSL;
        goto done;
    }
    while (start < len) {
        const uint8_t *newline = memchr(buf + start, '\n', (size_t)(len - start));
        int64_t end = newline - buf + 1, stop = end;  /* newline != NULL: buf ends with one */
        if (last_is_end && end == len)
            stop = end - 1;
        else if (end - start >= 2 && buf[end - 2] == ',')
            stop = end - 2;
        if ((lines + 1) * HASH_SIZE > out_len) {
            result = FEDGATE_NO_ROOM;
            goto done;
        }
        if (!sha256(&h, buf + start, (size_t)(stop - start), NULL, 0, out + lines * HASH_SIZE)) {
            result = FEDGATE_OPENSSL;
            goto done;
        }
        lines++;
        start = end;
    }
    result = lines;
done:
    hasher_close(&h);
    return result;
}

/*
 * The RFC 6962 tree head of the count >= 1 leaf hashes at leaves[0:32 * count], into root
 * (32 bytes), using scratch[0:scratch_len] (at least 32 * count bytes). Each level hashes
 * adjacent pairs as SHA-256(0x01 || left || right) and carries an odd last hash up unchanged:
 * the same tree as RFC 9162's split at the largest power of two below the size (its left
 * part is always a complete subtree, whose pairs this pairing forms). Returns 0.
 */
int64_t fedgate_tree_head(const uint8_t *leaves, int64_t count, uint8_t *scratch,
                          int64_t scratch_len, uint8_t *root) {
    static const uint8_t node_prefix = 0x01;
    if (count < 1 || scratch_len < count * HASH_SIZE)
        return FEDGATE_BAD_INPUT;
    hasher h;
    int64_t result = 0, width = count;
    if (!hasher_open(&h)) {
        result = FEDGATE_OPENSSL;
        goto done;
    }
    memcpy(scratch, leaves, (size_t)(count * HASH_SIZE));
    while (width > 1) {
        int64_t parents = 0;
        for (int64_t i = 0; i + 1 < width; i += 2, parents++) {
            if (!sha256(&h, &node_prefix, 1, scratch + i * HASH_SIZE, 2 * HASH_SIZE,
                        scratch + parents * HASH_SIZE)) {
                result = FEDGATE_OPENSSL;
                goto done;
            }
        }
        if (width & 1) {
            memmove(scratch + parents * HASH_SIZE, scratch + (width - 1) * HASH_SIZE, HASH_SIZE);
            parents++;
        }
        width = parents;
    }
    memcpy(root, scratch, HASH_SIZE);
done:
    hasher_close(&h);
    return result;
}
