/* medkd_sha256: one-shot SHA-256 (FIPS 180-4) in portable C99, no dependencies.
 *
 * medkd_blob_open uses it to check the payload's SHA-256 prefix stored in the MKDB
 * header, the same check the Python reader makes. Byte-oriented (no unaligned loads,
 * no endianness assumptions), so it gives the same digest on every target. */
#ifndef MEDKD_SHA256_H
#define MEDKD_SHA256_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MEDKD_SHA256_DIGEST_SIZE 32u

/* digest = SHA-256(data[0..size)); data may be NULL when size is 0. */
void medkd_sha256(const unsigned char *data, size_t size, unsigned char digest[MEDKD_SHA256_DIGEST_SIZE]);

#ifdef __cplusplus
}
#endif

#endif /* MEDKD_SHA256_H */
