#pragma once

// What a request's media references may make llama-server read.
//
// By default a request's image (audio, video) is data in the request: a data: URI or raw
// base64. Nothing else is read or fetched:
// - file: URLs only with a folder (--allowed-local-media DIR, upstream's --media-path): the
//   path is resolved (symlinks, ..) and must stay inside DIR and be a regular file;
// - http: URLs only with a host list (--allowed-media-hosts HOST[:PORT],...): redirects are
//   followed here, each hop checked against the list, with connect and read timeouts and a
//   byte limit (upstream's handle_media fetched any URL and followed any redirect);
// - every file is bounded in bytes, every request in files; an image must be a whole PNG,
//   JPEG, GIF or BMP whose header gives at most --max-image-pixels pixels, checked before
//   stb_image decodes anything (decompression bombs).
// Every refusal is a std::invalid_argument (HTTP 400) saying what to send or which flag
// allows it. The flag names and defaults are those of `python -m pykvsmooth.server`
// (pykvsmooth/media.py), so that both servers of this project answer alike.

#include <cstdint>
#include <string>
#include <vector>

struct common_params;

struct server_media_host {
    std::string host;  // lower-case; an IPv6 literal without brackets
    int         port;  // -1: any port
};

struct server_media_policy {
    std::string                    local_dir;  // "" (file: refused) or a folder ending in the separator
    std::vector<server_media_host> hosts;      // empty: no URL is fetched
    int64_t max_bytes;                         // per file
    int64_t max_pixels;                        // per image, width * height from its header
    int32_t max_files;                         // per request, images, audio and video together
    double  connect_timeout_s;
    double  read_timeout_s;                    // for a host's whole answer, after connecting
};

// the server's policy, from its flags
server_media_policy server_media_policy_from_params(const common_params & params);

// --allowed-media-hosts: "HOST[:PORT],..." (IPv6 as [::1]:PORT); throws std::invalid_argument
std::vector<server_media_host> server_media_parse_hosts(const std::string & list);

// the bytes a media reference of a request names, if the policy allows reading them:
// a data: URI, raw base64, a file: URL or an http(s): URL; is_image: also check the image
// (server_media_check_image); throws std::invalid_argument naming the problem
std::vector<uint8_t> server_media_load(const server_media_policy & policy, const std::string & url, bool is_image);

// a whole PNG, JPEG, GIF or BMP image of at most max_pixels pixels, judged from its
// structure without decoding it; throws std::invalid_argument naming the problem
void server_media_check_image(const std::vector<uint8_t> & data, int64_t max_pixels);

// at most max_files media files in a request; throws std::invalid_argument naming the limit
void server_media_check_count(const server_media_policy & policy, size_t n_files);

// bytes and count of files already in a request (a /completion prompt's multimodal_data);
// images among them are checked as images
void server_media_check_files(const server_media_policy & policy, const std::vector<std::vector<uint8_t>> & files);

class common_json;

// the files of a /completion or /embeddings prompt's multimodal_data (raw base64, possibly
// in an array of prompts), checked as server_media_check_files does
void server_media_check_prompt(const common_json & prompt, const server_media_policy & policy);
