/* medkd_embedded_check: link a generated <symbol>.c (from write_firmware_blob) and
 * validate the embedded array with medkd_blob_open - the same path firmware takes.
 *
 * Build-time configuration (set by CMakeLists.txt):
 *   MEDKD_EMBEDDED_SYMBOL  the array's C symbol (default medkd_model)
 *   MEDKD_EMBEDDED_HEADER  the generated header, as a string (default "medkd_model.h")
 */
#include "medkd_blob.h"

#include <stdio.h>

#ifndef MEDKD_EMBEDDED_SYMBOL
#define MEDKD_EMBEDDED_SYMBOL medkd_model
#endif
#ifndef MEDKD_EMBEDDED_HEADER
#define MEDKD_EMBEDDED_HEADER "medkd_model.h"
#endif
#include MEDKD_EMBEDDED_HEADER

#define MEDKD_CAT_(a, b) a##b
#define MEDKD_CAT(a, b) MEDKD_CAT_(a, b)
#define MEDKD_EMBEDDED_SIZE MEDKD_CAT(MEDKD_EMBEDDED_SYMBOL, _size)

int main(void) {
    medkd_blob blob;
    int rc = medkd_blob_open(MEDKD_EMBEDDED_SYMBOL, (size_t)MEDKD_EMBEDDED_SIZE, &blob);
    if (rc != MEDKD_BLOB_OK) {
        fprintf(stderr, "error: embedded blob: %s (code %d)\n", medkd_blob_strerror(rc), rc);
        return 1;
    }
    /* On the device, a MEDKD_BLOB_KIND_TENSORRT_ENGINE payload is handed as-is to
     * TensorRT: runtime->deserializeCudaEngine(blob.payload, blob.payload_size).
     * (An ONNX payload would go to the ONNX parser / ONNX Runtime instead.) This
     * check deliberately stops at validation and does not link TensorRT. */
    printf("ok kind=%s payload=%lu crc=0x%08lx aligned16=%d\n", medkd_blob_kind_name(blob.kind),
           (unsigned long)blob.payload_size, (unsigned long)blob.crc32,
           (int)(((size_t)blob.payload % 16u) == 0));
    return 0;
}
